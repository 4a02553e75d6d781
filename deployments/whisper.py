"""WhisperDeployment: speech-to-text behind ``@serve.batch``, a thin shim over an injected engine.

``transcribe(request, audio)`` is a streaming method (call it with ``handle.options(stream=True)``): it
decodes the upload (PyAV) and extracts log-mel features, both in worker threads, then submits the job;
the engine transcribes everything waiting together in one ``generate`` call (features padded to 30 s
windows; audio longer than 30 s is decoded window by window inside that call, as Whisper's long-form
decoding does). It yields ``[WhisperOutput]`` once. Nothing CPU-heavy runs on the replica's event loop.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray import serve

from app.protocol.audio import TranscriptionRequest
from deployments.batched import BatchedDeployment
from deployments.engines.records import WhisperOutput
from deployments.metrics import count_audio, timed


@serve.deployment(ray_actor_options={"num_cpus": 1})
class WhisperDeployment(BatchedDeployment):
    default_factory = "deployments.models.loader:load_whisper_engine"

    @timed
    async def transcribe(self, request: TranscriptionRequest, audio: bytes) -> AsyncIterator[list[WhisperOutput]]:
        """Stream the transcript of ``audio`` (the uploaded file's bytes); raises ServingError subclasses
        (InvalidRequest for undecodable, empty or too long audio and for bad settings)."""
        from deployments.engines.audio import SAMPLE_RATE, decode_audio
        from deployments.engines.whisper import to_decode_settings

        limits = self.spec.audio
        settings = await asyncio.to_thread(to_decode_settings, request, self.engine, limits)
        samples = await asyncio.to_thread(decode_audio, audio, sample_rate=SAMPLE_RATE,
                                          max_duration_s=limits.max_duration_s)
        job = await asyncio.to_thread(self.engine.prepare, samples, settings)
        async for outputs in self._stream(job):
            yield outputs
        count_audio(self.spec.id, len(samples) / SAMPLE_RATE)
