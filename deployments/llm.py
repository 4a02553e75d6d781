"""LLMDeployment: one chat model behind ``@serve.batch``, a thin shim over an injected engine.

``generate(request)`` is a streaming method (call it with ``handle.options(stream=True)``) for every
text-generation family (a chat completions or completions request; the ingress maps responses onto
chat): it yields lists of :class:`~deployments.engines.records.Delta` for that request. The wire request
becomes engine requests (``deployments.engines.prepared``: one per prompt) on a worker thread (size
check, chat template, tokenization: CPU work that must not stall the event loop, which streams every
other request's tokens); the engine then prefills what was admitted during a step together and decodes
all running requests together (continuous batching). One Ray message carries every token a request
produced since the previous one.

Preprocessing has two lanes (``deployments/lanes.py``): prompts of at most ``SMALL_PROMPT_CHARS``
characters never queue behind long ones. A prompt too long for the context by its size alone is refused
before either lane tokenizes it (see ``chat_params.prompt_bytes_limit``); :meth:`prompt_limits` tells the
ingress that bound, so it can refuse a huge body without even sending it here.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from ray import serve

from app.config import ChatModelSpec
from app.protocol.sampling import SamplingRequest
from deployments.batched import BatchedDeployment
from deployments.engines.prepared import merged
from deployments.engines.preparers import prepare
from deployments.engines.records import Delta
from deployments.lanes import SMALL_PROMPT_CHARS, Lanes
from deployments.metrics import timed

@serve.deployment(ray_actor_options={"num_cpus": 1})
class LLMDeployment(BatchedDeployment):
    default_factory = "deployments.models.loader:load_chat_engine"

    def __init__(self, spec: ChatModelSpec, engine_factory: Callable[[ChatModelSpec], Any] | None = None):
        super().__init__(spec, engine_factory)
        self._lanes = Lanes("preprocess", lambda: self.engine.tokenizer)
        self._limits: dict[str, int] | None = None

    @timed
    async def generate(self, request: SamplingRequest) -> AsyncIterator[list[Delta]]:
        """Stream the deltas of one generation request (choices numbered across its prompts); raises
        ServingError subclasses for bad input."""
        prepared = await self._on_lane(request, prepare, self.engine, self.spec.limits)
        async for deltas in merged(prepared, [self._stream(r) for r in prepared.requests]):
            yield deltas

    @timed
    async def tokenize(self, request: Any) -> AsyncIterator[list[Any]]:
        """``/tokenize`` and ``/detokenize``: one record with the answer (deployments.engines.tokenize)."""
        from deployments.engines.tokenize import run_tokenizer

        yield [await self._on_lane(request, run_tokenizer, self.engine, self.spec.limits)]

    async def _on_lane(self, request: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(request, *args, tokenizer)`` on the preprocessing lane that ``request``'s size picks. A
        request with images takes the large lane: decoding and processing images is not small work, and
        the processor shares the large lane's tokenizer."""
        images = getattr(request, "images", None)
        small = request.text_size_over(SMALL_PROMPT_CHARS) is None and not (images and images())
        return await self._lanes.run(small, fn, request, *args)

    async def prompt_limits(self) -> dict[str, int]:
        """``{"context_len": tokens, "prompt_bytes": most UTF-8 bytes of message text that can fit}``:
        the ingress refuses larger prompts itself."""
        if self._limits is None:
            from deployments.engines.chat_params import prompt_limits

            self._limits = await asyncio.to_thread(prompt_limits, self.engine)
        return self._limits
