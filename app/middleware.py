"""ASGI middleware of the ingress: request body size limit."""

from __future__ import annotations

from typing import Callable

from app.errors import RequestTooLarge, render


class BodySizeLimit:
    """Refuse request bodies over ``limit()`` bytes with 413 before any route sees them.

    A declared Content-Length is checked up front. A body without one (chunked) is read here first,
    counting, and replayed to the app only if it stays within the limit: the framework would otherwise
    turn an error raised while it parses the body into a generic 400.
    """

    def __init__(self, app, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                return await render(_too_large(limit))(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await render(_too_large(limit))(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this server's limit of {limit} bytes.")
