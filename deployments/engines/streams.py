"""The output side of the generation engine: what its model thread hands to the event loops.

A :class:`RequestStream` is one request's output, an async iterator of ``list[Delta]`` read on the
event loop that submitted the request; :func:`deliver_threadsafe` offers a step's output to streams from
the model thread (or any thread) and wakes only the loops whose readers wait for it.
"""

from __future__ import annotations

import asyncio
import threading

from app.errors import ServingError
from deployments.engines.records import Delta, GenerationRequest


class RequestStream:
    """The output of one request (all its choices), read on the event loop that submitted it.

    The model thread offers each step's output under a lock (:meth:`_offer`); the reader takes it. The
    loop is woken only when its reader waits for what was offered: a reader in a hold (see :meth:`hold`)
    wakes by its own timer and takes everything produced by then, so a held stream costs its loop
    nothing per step. Why: waking the loop at every step (about 130 a second at one client) took CPU
    and the GIL from the 2-thread step; with a reader holding 50 ms, delivering every sixth step instead
    made the engine's 1-row decode 4-7% faster (same process, alternating rounds). This class gave the
    engine +3% at 1 client and +6% at 8; through the server the gain is inside run-to-run spread
    (README, *Reading the figures*)."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()
        self._mutex = threading.Lock()
        # Under _mutex: output not yet taken, choices not yet finished, the error that ended the request,
        # and what a waiting reader waits for (_ANY, _END or None when it is not waiting).
        self._pending: list[Delta] = []
        self._unfinished = request.n
        self._error: ServingError | None = None
        self._waits: object | None = None
        self._wakeup = asyncio.Event()  # set on the loop, after _offer found the reader waiting
        # Loop time before which the next item is not handed out unless the request ended (see hold).
        self._not_before = 0.0

    @property
    def done(self) -> bool:
        return self._unfinished == 0 or self._error is not None

    def _offer(self, deltas: list[Delta], error: ServingError | None) -> bool:
        """Add output (any thread). True when the reader waits for it: the caller must then run
        ``self._wakeup.set()`` on :attr:`loop`."""
        with self._mutex:
            if self.done:
                return False
            self._pending.extend(deltas)
            self._unfinished -= sum(d.finish_reason is not None for d in deltas)
            if error is not None:
                self._error = error
            wake = self._waits is _ANY or (self._waits is _END and self.done)
            if wake:
                self._waits = None
            return wake

    def hold(self, seconds: float) -> None:
        """Coalescing: hand out the next item no sooner than ``seconds`` from now, with everything
        produced by then, unless the request ends first (its last item never waits). A consumer whose
        every item costs a message (a Ray hop, an SSE event) calls this after each item to bound its
        message rate; the first item, asked for before any hold, goes out as soon as it exists."""
        self._not_before = self.loop.time() + seconds

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> list[Delta]:
        while True:
            with self._mutex:
                self._waits = None  # not waiting now (a wait that its timer ended left it set)
                delay = self._not_before - self.loop.time()
                if self._pending and (delay <= 0 or self.done):
                    out, self._pending = self._pending, []
                    return out
                if self.done:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
                # In a hold only the end cuts the wait short; otherwise the next output ends it.
                held = delay > 0
                self._waits = _END if held else _ANY
                self._wakeup.clear()  # under the lock: a wake-up for this wait is set after it
            try:
                async with asyncio.timeout(delay if held else None):
                    await self._wakeup.wait()
            except TimeoutError:
                pass  # the hold is over: take what is there (a stale wake-up only costs a loop turn)


_ANY, _END = object(), object()  # what a waiting reader waits for: any output, or only the end


def deliver_threadsafe(items: list[tuple[RequestStream, list[Delta], ServingError | None]]) -> None:
    """Offer each item's deltas (or error) to its stream and wake the loops whose readers wait for
    them (one callback per loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[RequestStream]] = {}
    for stream, deltas, error in items:
        if stream._offer(deltas, error):
            by_loop.setdefault(stream.loop, []).append(stream)
    for loop, streams in by_loop.items():
        try:
            loop.call_soon_threadsafe(_wake, streams)
        except RuntimeError:  # that loop is closed: nobody is reading those streams any more
            pass


def _wake(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream._wakeup.set()
