"""PipelineDeployment: one transformers pipeline task (fill-mask, ...) behind ``@serve.batch``, a thin
shim over an injected engine.

``run(request)`` is a streaming method (call it with ``handle.options(stream=True)``): the wire request
(``app/protocol/pipeline.py``; the ingress checked it against the model's limits) is tokenized and
checked on a worker thread, then admitted; the engine answers every text of everything admitted while
its model thread was busy in one padded forward pass. It yields one list: a
:class:`~deployments.engines.pipeline_records.PipelineResult` per input text, in order. Nothing
CPU-heavy runs on the replica's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from ray import serve

from deployments.batched import BatchedDeployment
from deployments.engines.pipeline_records import PipelineResult
from deployments.metrics import timed


@serve.deployment(ray_actor_options={"num_cpus": 1})
class PipelineDeployment(BatchedDeployment):
    default_factory = "deployments.models.loader:load_pipeline_engine"

    @timed
    async def run(self, request: Any) -> AsyncIterator[list[PipelineResult]]:
        """Stream the answers to ``request`` (its texts and parameters); raises ServingError subclasses
        (InvalidRequest for a text the task cannot take: no mask token, too long, no usable target)."""
        job = await asyncio.to_thread(self.engine.prepare, request.texts(), request.params)
        async for results in self._stream(job):
            yield results
