"""A client that hangs up mid-upload is the client's doing (issue "Reliability under abuse"): the ingress
answers 499 (nginx's "client closed request", what the access log shows), logs one INFO line and no
traceback, and lets no exception out of the app (Ray Serve would log it as a failed request, at ERROR).

Driven through the real ingress app (``app.ingress.api``: body-size middleware, error handlers, routes)
at the ASGI level, which is where a hang-up arrives: ``http.disconnect`` instead of the rest of the body.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from app.errors import ClientDisconnected, as_serving_error
from app.ingress import api
from tests.unit.test_exact_names import http  # noqa: F401  (the bare ingress behind the real app)

BOUNDARY = "hangup"
PARTS = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndemo-whisper\r\n"
         f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
         "Content-Type: audio/wav\r\n\r\nRIFF....WAVE").encode()
# (route, content type, the part of the body that arrives before the hang-up)
CASES = [("/v1/chat/completions", "application/json", b'{"model": "d'),
         ("/v1/completions", "application/json", b'{"model": "demo-chat", "prompt": "a'),
         ("/v1/embeddings", "application/json", b"{"),
         ("/models/demo-fill-mask", "application/json", b'{"inputs": "a [MA'),
         ("/v1/audio/transcriptions", f"multipart/form-data; boundary={BOUNDARY}", PARTS),
         ("/v1/audio/translations", f"multipart/form-data; boundary={BOUNDARY}", PARTS[:20])]


def hang_up(path: str, content_type: str, sent: bytes, *, declared: int | None = 100_000) -> list[dict]:
    """POST ``sent`` (in two pieces) of a body declared ``declared`` bytes long (None: chunked), then hang
    up; the ASGI messages the app sent back. Raises whatever the app let out."""
    headers = [(b"host", b"test"), (b"content-type", content_type.encode())]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    inbound = [{"type": "http.request", "body": sent[:len(sent) // 2], "more_body": True},
               {"type": "http.request", "body": sent[len(sent) // 2:], "more_body": True}]
    outbound: list[dict] = []

    async def receive():
        return inbound.pop(0) if inbound else {"type": "http.disconnect"}

    async def send(message):
        outbound.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5555), "server": ("test", 80), "state": {}}
    asyncio.run(api(scope, receive, send))
    return outbound


@pytest.mark.parametrize("declared", [100_000, None], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path,content_type,sent", CASES, ids=[c[0] for c in CASES])
def test_a_hang_up_mid_body_is_a_499_in_one_info_line(http, caplog, path, content_type, sent, declared):  # noqa: F811
    with caplog.at_level(logging.DEBUG):
        outbound = hang_up(path, content_type, sent, declared=declared)  # nothing escapes the app
    assert outbound[0]["type"] == "http.response.start" and outbound[0]["status"] == 499, outbound
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(records) == 1, caplog.text
    [record] = records
    assert record.levelno == logging.INFO and record.exc_info is None and record.name == "app.errors"
    line = record.getMessage()
    assert "\n" not in line and f"POST {path}" in line and "499 client_disconnected" in line
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text
    # The server is fine: the next request on the same app is answered normally.
    assert http.get("/v1/models/demo-chat").status_code == 200


def test_the_hang_up_is_mapped_in_the_one_place():
    from starlette.requests import ClientDisconnect

    err = as_serving_error(ClientDisconnect())
    assert isinstance(err, ClientDisconnected) and err.status_code == 499 and err.code == "client_disconnected"


@pytest.mark.parametrize("path,content_type,sent", CASES[:1] + CASES[3:5], ids=["chat", "fill-mask", "audio"])
def test_a_body_trickled_past_the_body_timeout_is_a_408(http, path, content_type, sent):  # noqa: F811
    """A client that sends part of its body and then nothing more (but stays connected) is answered 408
    after ``ingress.body_timeout_s``, instead of holding its connection and request slot for as long as
    it likes."""
    settings = api.state.settings
    api.state.settings = settings.model_copy(update={"body_timeout_s": 0.3})
    headers = [(b"host", b"test"), (b"content-type", content_type.encode()), (b"content-length", b"100000")]
    inbound = [{"type": "http.request", "body": sent, "more_body": True}]
    outbound: list[dict] = []

    async def receive():
        if inbound:
            return inbound.pop(0)
        await asyncio.sleep(30)  # connected, silent
        return {"type": "http.disconnect"}

    async def send(message):
        outbound.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5555), "server": ("test", 80), "state": {}}
    try:
        started = asyncio.get_event_loop_policy().new_event_loop()
        started.run_until_complete(asyncio.wait_for(api(scope, receive, send), 10))
        started.close()
    finally:
        api.state.settings = settings
    start = next(m for m in outbound if m["type"] == "http.response.start")
    assert start["status"] == 408
    body = b"".join(m.get("body", b"") for m in outbound if m["type"] == "http.response.body")
    assert b"request_body_timeout" in body and b"body_timeout_s" in body
