"""EmbeddingDeployment: one text-embedding model behind ``@serve.batch``, a thin shim over an injected engine.

``embed(request)`` is a streaming method (call it with ``handle.options(stream=True)``): it turns the
request's inputs into token id rows on a preprocessing thread (tokenization, vocabulary and length checks:
CPU work kept off the event loop), submits the job, and yields once: the list of
:class:`~deployments.engines.embedding_records.EmbeddingOutput`, one per input, in input order. The engine
embeds every job waiting when its model thread is free together, in passes packed by token count
(``deployments/engines/embedding.py``).

Preprocessing has the chat deployment's two lanes (``deployments/lanes.py``), each one thread with a
tokenizer of its own: requests of at most ``SMALL_PROMPT_CHARS`` characters (or token ids) never queue
behind large ones, which the body limit allows to be megabytes (a 3.5 MB text takes the tokenizer about
6 s).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from ray import serve

from app.config import EmbeddingModelSpec
from app.protocol.embeddings import EmbeddingRequest
from deployments.batched import BatchedDeployment
from deployments.engines.embedding_records import EmbeddingOutput
from deployments.lanes import SMALL_PROMPT_CHARS, Lanes
from deployments.metrics import timed


@serve.deployment(ray_actor_options={"num_cpus": 1})
class EmbeddingDeployment(BatchedDeployment):
    default_factory = "deployments.models.loader:load_embedding_engine"

    def __init__(self, spec: EmbeddingModelSpec, engine_factory: Callable[[EmbeddingModelSpec], Any] | None = None):
        super().__init__(spec, engine_factory)
        self._lanes = Lanes("embed-preprocess", lambda: self.engine.tokenizer)

    @timed
    async def embed(self, request: EmbeddingRequest) -> AsyncIterator[list[EmbeddingOutput]]:
        """Stream the embeddings of ``request`` (one list); raises InvalidRequest / ContextLengthExceeded
        for an input the model cannot take (a bad token id, too long, unsupported dimensions)."""
        job = await self._lanes.run(request.size <= SMALL_PROMPT_CHARS, self._prepare, request)
        async for outputs in self._stream(job):
            yield outputs

    def _prepare(self, request: EmbeddingRequest, tokenizer: Any) -> Any:
        return self.engine.prepare(request.input, truncate=request.truncate_prompt_tokens,
                                   dimensions=request.dimensions, tokenizer=tokenizer)
