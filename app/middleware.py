"""ASGI middleware of the ingress: request body size limit."""

from __future__ import annotations

from typing import Callable

from app.errors import RequestTooLarge, render


class BodySizeLimit:
    """Refuse request bodies over ``limit()`` bytes with 413, before the route reads them.

    A declared Content-Length is checked up front; a chunked body is counted as it is read, and the
    route fails with RequestTooLarge (rendered by the error handlers) once it passes the limit.
    """

    def __init__(self, app, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await render(_too_large(limit))(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        return await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this server's limit of {limit} bytes.")
