"""The browser playground (README: Playground): ``GET /playground``, its script and stylesheet, and
``GET /`` redirecting there.

The page is static: plain HTML, JS and CSS shipped in ``app/static/`` (package data; no build step, no
CDN, nothing fetched from another host). Every call it makes goes through the public API
(``/v1/models``, ``/v1/chat/completions``, ``/v1/audio/transcriptions``) with the key the user typed, so
these routes hold no data and are open without a key (:data:`OPEN_PATHS`, which the ingress gives
:class:`app.middleware.ApiKeyAuth`). The files are read once, at import; a request only sends bytes
that are already in memory.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

PAGE = "/playground"

# (path, file in app/static, content type); the page names its script and stylesheet relative to itself
# ("playground/playground.js"), so it works under any application route prefix.
_FILES = (
    (PAGE, "playground.html", "text/html; charset=utf-8"),
    (f"{PAGE}/playground.js", "playground.js", "text/javascript; charset=utf-8"),
    (f"{PAGE}/playground.css", "playground.css", "text/css; charset=utf-8"),
)

# Revalidate on every load (a new server version is seen at once); nothing may be sniffed, framed, or
# loaded from anywhere but this server (the page uses no inline script or style).
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; media-src 'self' blob:; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}

_STATIC = files("app") / "static"
_CONTENT: dict[str, tuple[bytes, str]] = {path: (_STATIC.joinpath(name).read_bytes(), media_type)
                                          for path, name, media_type in _FILES}

# The paths a browser loads without an Authorization header: ApiKeyAuth lets these through (exact match).
OPEN_PATHS = frozenset({"/", *_CONTENT})

router = APIRouter()


def _add_file_route(path: str) -> None:
    body, media_type = _CONTENT[path]

    async def static_file() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    router.add_api_route(path, static_file, methods=["GET"], include_in_schema=False,
                         name=f"playground:{path.rsplit('/', 1)[-1]}")


for _path in _CONTENT:
    _add_file_route(_path)


@router.get("/", include_in_schema=False)
async def root(request: Request) -> RedirectResponse:
    """``/`` → the playground, under the application's route prefix (``root_path``) when it has one."""
    return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + PAGE, status_code=307)
