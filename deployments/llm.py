"""LLMDeployment: one chat model behind ``@serve.batch``, a thin shim over an injected engine.

``chat(request)`` is a streaming method (call it with ``handle.options(stream=True)``): it yields lists
of :class:`Delta` for that request. Requests arriving within ``batch_wait_timeout_s`` of each other (up to
``max_batch_size``) are admitted to the engine together by ``@serve.batch``; the engine prefills what
was admitted during a step together and decodes all admitted requests together (continuous batching). Each request then streams from
its own engine stream: one Ray message carries every token produced since the previous one, so a busy
ingress gets fewer, fuller messages instead of falling behind one message per token.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Callable

from ray import serve

from app.config import BatchingSpec, ModelSpec
from app.protocol.chat import ChatCompletionRequest
from deployments.batching import batching_from_user_config
from deployments.chat_params import render_prompt, to_generation_request
from deployments.engine import GenerationEngine, RequestStream
from deployments.generation import Delta, GenerationRequest
from deployments.loader import context_length, load_chat_engine

logger = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 1})
class LLMDeployment:
    def __init__(self, spec: ModelSpec,
                 engine_factory: Callable[[ModelSpec], GenerationEngine] = load_chat_engine) -> None:
        self.spec = spec
        self.engine = engine_factory(spec)
        self.context_len = context_length(spec, self.engine)
        self._apply(spec.batching)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (a partial :class:`BatchingSpec`) without restarting the replica."""
        self._apply(batching_from_user_config(self.spec, user_config))

    def _apply(self, batching: BatchingSpec) -> None:
        self.batching = batching
        self._admit.set_max_batch_size(batching.max_batch_size)
        self._admit.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.engine.max_running_rows = batching.max_running_rows
        self.engine.max_prefill_tokens = batching.max_prefill_tokens

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[list[Delta]]:
        """Stream the deltas of one chat request; raises ServingError subclasses for bad input."""
        prompt_ids = render_prompt(self.engine.tokenizer, request)
        generation = to_generation_request(request, prompt_ids, self.spec.limits, self.context_len)
        async for deltas in self._generate(generation):
            yield deltas

    async def _generate(self, generation: GenerationRequest) -> AsyncIterator[list[Delta]]:
        try:
            stream = await self._admit(generation)
            async for deltas in stream:
                yield deltas
        finally:
            generation.cancelled = True  # the caller left (or we finished): free the engine rows

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _admit(self, requests: list[GenerationRequest]) -> list[RequestStream]:
        """Admission: the requests of one @serve.batch batch are prefilled together. Returns at once
        (the streams are in-process objects), so the next batch can form while these decode."""
        return self.engine.submit(requests)

    def stats(self) -> dict[str, Any]:
        """Engine counters and the live batching settings (for tests and operators)."""
        return {"steps": self.engine.steps, "tokens_generated": self.engine.tokens_generated,
                "running_rows": self.engine.running_rows, "context_len": self.context_len,
                "batching": self.batching.model_dump()}

    async def check_health(self) -> None:
        """Ray Serve's replica health check (and /health's probe): answering proves the event loop runs."""

