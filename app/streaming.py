"""One response path for streamed and non-streamed answers.

A handler produces an async iterator of wire chunks. :func:`respond` either collects it into the
non-streamed body or frames it as server-sent events. Before any SSE header is sent it waits for the
first chunk, so failures that happen before generation starts (unknown model, overload, bad length)
still get their proper HTTP status; a failure after that becomes an error frame in the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from app.errors import InternalError, RequestTimedOut, ServingError, as_serving_error, for_client

logger = logging.getLogger(__name__)

Chunk = TypeVar("Chunk", bound=BaseModel)


def _json(body: BaseModel) -> Response:
    return JSONResponse(body.model_dump())


def _ignore(error: ServingError | None = None, *, cancelled: bool = False) -> None:
    pass


async def respond(chunks: AsyncIterator[Chunk], *, stream: bool,
                  collect: Callable[[AsyncIterator[Chunk]], Awaitable[Any]],
                  dump: Callable[[Chunk], dict[str, Any]] = lambda c: c.model_dump(),
                  render: Callable[[Any], Response] = _json,
                  timeout_s: float | None = None, on_end: Callable[..., None] = _ignore) -> Response:
    """Answer with ``render(collect(chunks))`` (JSON by default), or with ``chunks`` as SSE (``dump``
    renders each).

    Past ``timeout_s`` (from now) the answer is a 504, or a timeout error frame once streaming began,
    and ``chunks`` is closed, which cancels the upstream work. ``on_end`` learns how the answer ended,
    once: ``on_end()`` complete, ``on_end(error)``, or ``on_end(cancelled=True)`` when the client left
    during the stream (app/metrics.py).
    """
    if timeout_s is not None:
        chunks = with_deadline(chunks, timeout_s)
    try:
        if not stream:
            response = render(await collect(chunks))
            on_end()
            return response
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except Exception as exc:
        err = as_serving_error(exc)
        on_end(err)
        raise err from exc
    return StreamingResponse(_sse(first, chunks, dump, on_end), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def upstream(response: Any) -> AsyncIterator[Any]:
    """Iterate a Ray streaming handle response; cancel it when the consumer stops early.

    A client that disconnects or times out closes this generator; cancelling the handle call then
    cancels the request in the model replica, which frees its batch slot.
    """
    finished = False
    try:
        async for item in response:
            yield item
        finished = True
    finally:
        if not finished:
            response.cancel()


@dataclass(frozen=True)
class Served:
    """Where a request ran: a deployment may put it first in the first list of records it streams (the
    multiplexed deployment does); :func:`without_marks` takes it out for the ``x-replica-id`` header."""

    replica_id: str
    model: str


@dataclass(frozen=True)
class ReplicaTime:
    """A model replica's seconds from a call's arrival to its first records: the deployments put it at
    the head of their first list (``deployments/metrics.py`` ``timed``), and :func:`without_marks` hands
    it to the request's metrics, which subtract it from the ingress's own time (app/metrics.py)."""

    seconds: float


async def without_marks(records: AsyncIterator[list[Any]], headers: dict[str, str],
                        metrics: Any = None) -> AsyncIterator[list[Any]]:
    """``records`` without their leading marks: a :class:`Served`'s replica id goes to ``headers``
    (``x-replica-id``), a :class:`ReplicaTime` to ``metrics`` (an app.metrics.RequestMetrics), which also
    learns when the first records arrived. Closing this closes ``records`` (which cancels the upstream
    call)."""
    first = True
    try:
        async for items in records:
            while items and isinstance(items[0], (Served, ReplicaTime)):
                if isinstance(items[0], Served):
                    headers["x-replica-id"] = items[0].replica_id
                elif metrics is not None:
                    metrics.replica_time(items[0].seconds)
                items = items[1:]
            if first and metrics is not None:
                metrics.first_records()
            first = False
            if items:
                yield items
    finally:
        await records.aclose()


async def with_deadline(chunks: AsyncIterator[Chunk], timeout_s: float) -> AsyncIterator[Chunk]:
    """``chunks`` for ``timeout_s`` from the first request for one; then close them and raise
    RequestTimedOut."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimedOut(f"The request did not complete within {timeout_s:g} s.") from None
            yield chunk
    finally:
        await chunks.aclose()


# Characters that Python's str.splitlines (httpx's aiter_lines, which many SSE clients read with) takes for
# line breaks and json.dumps leaves raw: escaped, so a model writing U+2028 cannot split an event.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(payload: dict[str, Any] | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


async def _sse(first: Chunk | None, rest: AsyncIterator[Chunk], dump: Callable[[Chunk], dict[str, Any]],
               on_end: Callable[..., None]) -> AsyncIterator[str]:
    try:
        if first is None:
            yield sse_data("[DONE]")
            on_end()
            return
        yield sse_data(dump(first))
        try:
            async for chunk in rest:
                yield sse_data(dump(chunk))
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            err = as_serving_error(exc)
            if isinstance(err, InternalError):
                logger.exception("stream failed", exc_info=exc)
            on_end(err)
            yield sse_data(for_client(err).body())
        yield sse_data("[DONE]")
        on_end()
    finally:  # closed or cancelled before its end: the client went away (on_end counts only the first)
        on_end(cancelled=True)
