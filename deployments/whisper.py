"""WhisperDeployment: speech-to-text behind ``@serve.batch``, a thin shim over an injected engine.

``transcribe(request, audio)`` is a streaming method (call it with ``handle.options(stream=True)``): it
decodes the upload (PyAV, in a worker thread), extracts log-mel features (worker thread), then waits for
its batch: requests arriving within ``batch_wait_timeout_s`` of each other (up to ``max_batch_size``) are
transcribed by one ``generate`` call (features padded to 30 s windows; audio longer than 30 s is decoded
sequentially window by window inside that call, as Whisper's long-form decoding does). It yields one
:class:`WhisperOutput` per request. Nothing CPU-heavy ever runs on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

from ray import serve

from app.config import BatchingSpec, ModelSpec
from deployments.batching import batching_from_user_config
from app.protocol.audio import TranscriptionRequest
from deployments.audio import SAMPLE_RATE, decode_audio
from deployments.whisper_engine import (AudioJob, WhisperEngine, WhisperOutput, load_whisper_engine,
                                        to_decode_settings)

logger = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 1})
class WhisperDeployment:
    def __init__(self, spec: ModelSpec,
                 engine_factory: Callable[[ModelSpec], WhisperEngine] = load_whisper_engine) -> None:
        self.spec = spec
        self.engine = engine_factory(spec)
        self.batches = 0  # generate batches run, for stats()
        self._apply(spec.batching)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (a partial :class:`BatchingSpec`; max_running_rows is unused here)."""
        self._apply(batching_from_user_config(self.spec, user_config))

    def _apply(self, batching: BatchingSpec) -> None:
        self.batching = batching
        self._transcribe_batch.set_max_batch_size(batching.max_batch_size)
        self._transcribe_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    async def transcribe(self, request: TranscriptionRequest, audio: bytes) -> AsyncIterator[WhisperOutput]:
        """Stream the transcript of ``audio`` (the uploaded file's bytes); raises ServingError subclasses
        (InvalidRequest for undecodable, empty or too long audio and for bad settings)."""
        settings = to_decode_settings(request, self.engine, self.spec.audio)
        samples = await asyncio.to_thread(decode_audio, audio, sample_rate=SAMPLE_RATE,
                                          max_duration_s=self.spec.audio.max_duration_s)
        job = await asyncio.to_thread(self.engine.prepare, samples, settings)
        yield await self._transcribe_batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _transcribe_batch(self, jobs: list[AudioJob]) -> list[WhisperOutput]:
        self.batches += 1
        # One worker thread per batch; @serve.batch runs one batch at a time, so the model is never
        # used by two threads at once.
        return await asyncio.to_thread(self.engine.transcribe, jobs)

    def stats(self) -> dict[str, Any]:
        """Batching counters and the live batching settings (for tests and operators)."""
        return {"batches": self.batches, "windows": self.engine.windows_decoded,
                "batching": self.batching.model_dump()}

    async def check_health(self) -> None:
        """Ray Serve's replica health check."""
