"""LLMDeployment: one chat model behind ``@serve.batch``, a thin shim over an injected engine.

``chat(request)`` is a streaming method (call it with ``handle.options(stream=True)``): it yields lists
of :class:`~deployments.engines.records.Delta` for that request. The wire request becomes a
:class:`GenerationRequest` on a worker thread (size check, chat template, tokenization: CPU work that
must not stall the event loop, which streams every other request's tokens); the engine then prefills
what was admitted during a step together and decodes all running requests together (continuous
batching). One Ray message carries every token a request produced since the previous one.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from ray import serve

from app.config import ChatModelSpec
from app.protocol.chat import ChatCompletionRequest
from deployments.batched import BatchedDeployment
from deployments.engines.records import Delta


@serve.deployment(ray_actor_options={"num_cpus": 1})
class LLMDeployment(BatchedDeployment):
    default_factory = "deployments.models.loader:load_chat_engine"

    def __init__(self, spec: ChatModelSpec, engine_factory: Callable[[ChatModelSpec], Any] | None = None):
        super().__init__(spec, engine_factory)
        # One thread: the tokenizer is not shared between threads, and a prompt that reaches it is
        # already bounded by the context (see prompt_bytes_limit), so no request holds it for long.
        self._preprocess = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess")

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[list[Delta]]:
        """Stream the deltas of one chat request; raises ServingError subclasses for bad input."""
        from deployments.engines.chat_params import to_generation_request

        generation = await asyncio.get_running_loop().run_in_executor(
            self._preprocess, to_generation_request, request, self.engine, self.spec.limits)
        async for deltas in self._stream(generation):
            yield deltas
