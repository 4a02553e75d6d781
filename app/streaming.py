"""One response path for streamed and non-streamed answers.

A handler produces an async iterator of wire chunks. :func:`respond` either collects it into the
non-streamed body or frames it as server-sent events. Before any SSE header is sent it waits for the
first chunk, so failures that happen before generation starts (unknown model, overload, bad length)
still get their proper HTTP status; a failure after that becomes an error frame in the stream.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from app.errors import InternalError, as_serving_error

logger = logging.getLogger(__name__)

Chunk = TypeVar("Chunk", bound=BaseModel)


async def respond(chunks: AsyncIterator[Chunk], *, stream: bool,
                  collect: Callable[[AsyncIterator[Chunk]], Awaitable[BaseModel]],
                  dump: Callable[[Chunk], dict[str, Any]] = lambda c: c.model_dump()) -> Any:
    """Answer with ``collect(chunks)`` as JSON, or with ``chunks`` as SSE (``dump`` renders each)."""
    try:
        if not stream:
            return JSONResponse((await collect(chunks)).model_dump())
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except Exception as exc:
        raise as_serving_error(exc) from exc
    return StreamingResponse(_sse(first, chunks, dump), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse_data(payload: dict[str, Any] | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n"


async def _sse(first: Chunk | None, rest: AsyncIterator[Chunk],
               dump: Callable[[Chunk], dict[str, Any]]) -> AsyncIterator[str]:
    if first is None:
        yield sse_data("[DONE]")
        return
    yield sse_data(dump(first))
    try:
        async for chunk in rest:
            yield sse_data(dump(chunk))
    except Exception as exc:  # headers are gone: report in-band, as OpenAI does
        err = as_serving_error(exc)
        if isinstance(err, InternalError):
            logger.exception("stream failed", exc_info=exc)
        yield sse_data(err.body())
    yield sse_data("[DONE]")
