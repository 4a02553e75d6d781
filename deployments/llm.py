"""LLMDeployment: one chat model behind ``@serve.batch``, a thin shim over an injected engine.

``chat(request)`` is a streaming method (call it with ``handle.options(stream=True)``): it yields lists
of :class:`Delta` for that request. Requests arriving within ``batch_wait_timeout_s`` of each other (up to
``max_batch_size``) are admitted to the engine together and prefilled as one batch; the engine decodes
all admitted requests together (continuous batching), so several @serve.batch batches run at once.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Callable

from ray import serve

from app.config import BatchingSpec, ModelSpec
from app.protocol.chat import ChatCompletionRequest
from deployments.chat_params import render_prompt, to_generation_request
from deployments.engine import GenerationEngine
from deployments.generation import Delta, GenerationRequest
from deployments.loader import context_length, load_chat_engine

logger = logging.getLogger(__name__)

# @serve.batch's concurrency cap is fixed when the class is defined; the engine's max_running_rows is the
# real bound on concurrent sequences, so allow many admitted batches at once.
MAX_CONCURRENT_BATCHES = 64


class _BatchSizeWarningFilter(logging.Filter):
    # Ray warns when max_ongoing_requests < max_batch_size * max_concurrent_batches; with continuous
    # batching that product is not a meaningful bound (the engine caps rows), so the warning misleads.
    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


logging.getLogger("ray.serve").addFilter(_BatchSizeWarningFilter())


@serve.deployment(ray_actor_options={"num_cpus": 1})
class LLMDeployment:
    def __init__(self, spec: ModelSpec,
                 engine_factory: Callable[[ModelSpec], GenerationEngine] = load_chat_engine) -> None:
        self.spec = spec
        self.engine = engine_factory(spec)
        self.context_len = context_length(spec, self.engine)
        self.batching = spec.batching
        self._apply(spec.batching)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (a partial :class:`BatchingSpec`) without restarting the replica."""
        batching = BatchingSpec.model_validate({**self.spec.batching.model_dump(), **(user_config or {})})
        max_ongoing = _replica_max_ongoing_requests()
        if max_ongoing is not None and max_ongoing < batching.max_batch_size:
            raise ValueError(
                f"deployment {self.spec.deployment_name!r}: max_ongoing_requests ({max_ongoing}) must be "
                f">= max_batch_size ({batching.max_batch_size}), or batches can never fill; raise "
                "max_ongoing_requests or lower user_config.max_batch_size")
        self._apply(batching)

    def _apply(self, batching: BatchingSpec) -> None:
        self.batching = batching
        self._generate_batch.set_max_batch_size(batching.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.engine.max_running_rows = batching.max_running_rows

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[list[Delta]]:
        """Stream the deltas of one chat request; raises ServingError subclasses for bad input."""
        prompt_ids = render_prompt(self.engine.tokenizer, request)
        generation = to_generation_request(request, prompt_ids, self.spec.limits, self.context_len)
        async for deltas in self._generate(generation):
            yield deltas

    async def _generate(self, generation: GenerationRequest) -> AsyncIterator[list[Delta]]:
        unfinished = generation.n
        try:
            async for item in self._generate_batch(generation):
                if isinstance(item, BaseException):
                    raise item
                if item:
                    yield item
                    unfinished -= sum(d.finish_reason is not None for d in item)
                    if unfinished == 0:
                        return  # do not wait for the batch's next step to learn we are done
        finally:
            generation.cancelled = True  # the caller left (or we finished): free the engine rows

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005,
                 max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _generate_batch(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        async for outputs in self.engine.generate(requests):
            # None marks a request the engine finished earlier; Ray ends that caller's stream on it.
            yield [StopIteration if out is None else out for out in outputs]

    def stats(self) -> dict[str, Any]:
        """Engine counters and the live batching settings (for tests and operators)."""
        return {"steps": self.engine.steps, "tokens_generated": self.engine.tokens_generated,
                "running_rows": self.engine.running_rows, "context_len": self.context_len,
                "batching": self.batching.model_dump()}

    async def check_health(self) -> None:
        """Ray Serve's replica health check; a dead engine loop would surface here."""


def _replica_max_ongoing_requests() -> int | None:
    try:
        return serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # not inside a replica (unit tests) or Ray moved the private field
        return None
