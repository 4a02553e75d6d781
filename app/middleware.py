"""ASGI middleware of the ingress: API keys and the request body size limit."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Callable

from app.auth import EVERYTHING, Grant, KeyRing, presented_key
from app.errors import AuthenticationFailed, RequestTooLarge, render

# The grant of the request being handled (set by ApiKeyAuth around the app's call): a context variable,
# since Ray Serve's class-based routes cannot take FastAPI's Request by annotation here.
_GRANT: ContextVar[Grant | None] = ContextVar("api_grant", default=EVERYTHING)


def current_grant() -> Grant | None:
    """What the current request's API key may use: EVERYTHING when keys are off; None when it has no
    valid key, which only an open path (``/health``, the playground's files) lets through."""
    return _GRANT.get()


class ApiKeyAuth:
    """When ``keyring()`` gives a KeyRing, refuse a request without one of its keys with 401 before any
    route (or the body limit) sees it, on every path but ``open_paths``; the key's grant is the request's
    :func:`current_grant`, which the ingress applies per model (``app/auth.py``)."""

    def __init__(self, app, keyring: Callable[[], KeyRing | None], open_paths: frozenset[str]) -> None:
        self.app, self.keyring, self.open_paths = app, keyring, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        ring = self.keyring()
        if ring is None:
            grant = EVERYTHING
        else:
            key = presented_key(dict(scope.get("headers") or ()))
            grant = ring.grant(key)
            if grant is None and scope["type"] == "websocket":  # no route takes one; never open either
                return await send({"type": "websocket.close", "code": 1008})
            if grant is None and _route_path(scope) not in self.open_paths:
                err = AuthenticationFailed(
                    "Incorrect API key provided." if key else "Missing API key: send it as "
                    "`Authorization: Bearer <key>` (the openai SDK's api_key) or as `x-api-key`.",
                    headers={"WWW-Authenticate": "Bearer"})
                return await render(err)(scope, receive, send)
        token = _GRANT.set(grant)
        try:
            return await self.app(scope, receive, send)
        finally:
            _GRANT.reset(token)


def _route_path(scope) -> str:
    """The path the app routes on: without the application's route prefix (``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    return path[len(root):] or "/" if root and path.startswith(root) else path


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
