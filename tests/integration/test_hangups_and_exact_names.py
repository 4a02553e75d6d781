"""Reliability under abuse, over the real server: a client that hangs up mid-upload is one INFO line
with status 499 in the ingress's log (no ERROR, no traceback) and the next request is served; a model
name followed by a newline names no model, on every route."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.openapi_schema import assert_valid

pytestmark = pytest.mark.integration


def ingress_logs() -> list[Path]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return sorted(logs.glob("replica_openai_OpenAIIngress_*.log"))


def log_sizes() -> dict[Path, int]:
    return {path: path.stat().st_size for path in ingress_logs()}


def written_since(sizes: dict[Path, int]) -> str:
    """What the ingress replicas logged since ``sizes`` were taken."""
    text = ""
    for path in ingress_logs():
        with path.open("rb") as f:
            f.seek(sizes.get(path, 0))
            text += f.read().decode("utf-8", "replace")
    return text


def hang_up(server: str, path: str, content_type: str, sent: bytes, request_id: str) -> None:
    """Send the headers of a 100,000-byte POST and ``sent`` (its first bytes), then close the socket."""
    url = urlsplit(server)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: 100000\r\nx-request-id: {request_id}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + sent)
        time.sleep(0.5)  # the request reaches the ingress and waits for the rest of its body


BOUNDARY = "hangup"
MULTIPART = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndemo-whisper\r\n"
             f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
             "Content-Type: audio/wav\r\n\r\nRIFF").encode()


def test_a_hang_up_mid_upload_is_one_info_line_and_the_server_goes_on(server):
    sizes = log_sizes()
    cases = {f"hangup-{uuid.uuid4().hex}": ("/v1/chat/completions", "application/json", b'{"model": '),
             f"hangup-{uuid.uuid4().hex}": ("/v1/audio/transcriptions",
                                            f"multipart/form-data; boundary={BOUNDARY}", MULTIPART)}
    for request_id, (path, content_type, sent) in cases.items():
        hang_up(server, path, content_type, sent, request_id)
    deadline = time.time() + 30
    while time.time() < deadline:
        text = written_since(sizes)
        lines = {rid: [line for line in text.splitlines() if rid in line] for rid in cases}
        if all(any(" 499" in line for line in found) for found in lines.values()):
            break
        time.sleep(0.5)
    for request_id, found in lines.items():
        assert any(" 499" in line for line in found), (request_id, found, text[-3000:])
        assert not any(line.startswith(("ERROR", "WARNING")) for line in found), found
    assert "Traceback" not in text and "ClientDisconnect" not in text, text[-3000:]
    assert not any(line.startswith("ERROR") for line in text.splitlines()), text[-3000:]
    # The next ordinary request is served.
    resp = requests.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert resp.status_code == 200, resp.text


NEWLINE_NAMES = [
    ("GET", "/v1/models/demo-chat%0A", None, "demo-chat\n"),
    ("GET", "/v1/models/demo-chat-s1%0A", None, "demo-chat-s1\n"),  # on demand
    ("GET", "/v1/models/demo-chat%0D%0A", None, "demo-chat\r\n"),
    ("POST", "/models/demo-fill-mask%0A", {"json": {"inputs": "Paris is the [MASK] of France."}},
     "demo-fill-mask\n"),
    ("POST", "/v1/chat/completions", {"json": {"model": "demo-chat\n", "messages": [
        {"role": "user", "content": "hi"}]}}, "demo-chat\n"),
    ("POST", "/v1/chat/completions", {"json": {"model": "demo-chat-s1\n", "messages": [
        {"role": "user", "content": "hi"}]}}, "demo-chat-s1\n"),
    ("POST", "/v1/completions", {"json": {"model": "demo-chat\n", "prompt": "hi"}}, "demo-chat\n"),
    ("POST", "/v1/embeddings", {"json": {"model": "all-MiniLM-L6-v2\n", "input": "hi"}}, "all-MiniLM-L6-v2\n"),
    ("POST", "/v1/audio/transcriptions", {"data": {"model": "demo-whisper\n"},
                                          "files": {"file": ("a.wav", b"RIFF", "audio/wav")}}, "demo-whisper\n"),
]


@pytest.mark.parametrize("method,path,kwargs,name", NEWLINE_NAMES,
                         ids=[f"{c[0]} {c[1]} {c[3]!r}" for c in NEWLINE_NAMES])
def test_a_name_with_a_newline_names_no_model(server, method, path, kwargs, name):
    resp = requests.request(method, f"{server}{path}", timeout=60, **(kwargs or {}))
    assert resp.status_code == 404, resp.text
    assert_valid(resp.json(), "ErrorResponse")
    error = resp.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model", error
    assert f"'{name}'" in error["message"]
