"""The shape of engines that answer each job once (Whisper, embeddings, pipeline tasks), as opposed to
the generation engine, which streams tokens.

:class:`JobEngine` implements the Engine contract's queueing half (``deployments/engines/base.py``):
``submit`` queues jobs and returns one :class:`JobStream` each; a task on the submitting event loop hands
everything waiting (jobs cancelled meanwhile left out) to :meth:`JobEngine._serve`, whose default runs
``_compute`` on the engine's single model thread, so the jobs that arrived while it computed are served
together next; ``close`` fails what still waits and releases the model. A subclass supplies
``_compute`` (or overrides ``_serve`` to split the work, as the embedding engine does), ``apply`` and
``stats``. A job is any object with a ``cancelled`` flag.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from app.errors import InternalError, ServingError
from deployments.engines.base import release_memory

logger = logging.getLogger(__name__)


class JobStream:
    """The output of one job: one item (the list of records that answers it), or the error that failed
    it."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self._future: asyncio.Future = asyncio.get_running_loop().create_future()

    def __aiter__(self):
        return self._items()

    async def _items(self):
        yield await self._future

    def set(self, records: list[Any] | None, error: ServingError | None = None) -> None:
        """Answer the job (on its event loop); only the first answer counts."""
        if self._future.done():
            return
        if error is not None:
            self._future.set_exception(error)
        else:
            self._future.set_result(records)


class JobEngine:
    """Base of the engines that answer each job once (see the module docstring)."""

    failure = "the model failed on this batch"  # what a job learns when its batch fails on the model thread

    def __init__(self, thread_name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._waiting: deque[JobStream] = deque()
        self._loop_task: asyncio.Task | None = None

    def submit(self, jobs: Sequence[Any]) -> list[JobStream]:
        """Queue ``jobs``; everything waiting when the model thread is free is served together."""
        streams = [JobStream(job) for job in jobs]
        self._waiting.extend(streams)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        return streams

    async def _run(self) -> None:
        while self._waiting:
            streams = [s for s in self._waiting if not s.job.cancelled]
            self._waiting.clear()
            if streams:
                await self._serve(streams)

    async def _serve(self, streams: list[JobStream]) -> None:
        """Answer ``streams`` with one ``_compute`` call on the model thread; a failure there fails them
        all (and is logged), and the engine keeps serving."""
        try:
            answers = await self._on_model_thread(self._compute, [s.job for s in streams])
        except Exception:  # a bug or a device failure: fail this batch, keep serving
            logger.exception("%s: batch failed", type(self).__name__)
            self._fail(streams)
            return
        for stream, records in zip(streams, answers):
            stream.set(records)

    def _compute(self, jobs: list[Any]) -> list[list[Any]]:
        """On the model thread: the records answering each job, in order."""
        raise NotImplementedError

    async def _on_model_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _fail(self, streams: list[JobStream]) -> None:
        for stream in streams:
            stream.set(None, InternalError(self.failure))

    def close(self) -> None:
        """Fail what still waits, stop the model thread, release the model's memory."""
        for stream in self._waiting:
            stream.set(None, InternalError("the model was unloaded"))
        self._waiting.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.model = None
        release_memory(self.device.type)
