"""app/images.py: image_url parts made ready on the ingress (data URL size, web fetch, file read).

Web fetches go to a small HTTP server on a real local socket (asyncio, in the test's loop), so the
whole httpx path runs: streaming, the byte cap, the total timeout, manual redirects."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from types import SimpleNamespace

import pytest

from app.config import ImageFetchSpec, IngressSpec
from app.errors import InvalidRequest
from app.images import (FETCH_FAILED, FETCH_TIMEOUT, INVALID_URL, NOT_ALLOWED, TOO_LARGE, host_allowed,
                        resolve_images)
from app.protocol.chat import ChatCompletionRequest
from app.serving.base import Inbound, image_policy

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def chat(*urls: str) -> ChatCompletionRequest:
    """A request whose user message holds a text part then one image part per URL."""
    parts = [{"type": "text", "text": "look"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}])


def data_of(request: ChatCompletionRequest) -> list[bytes | None]:
    return [image.data for _, image in request.images()]


async def refused(request, policy) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        await resolve_images(request, policy)
    err = caught.value
    assert err.status_code == 400 and err.param and err.param.startswith("messages[0].content[")
    return err


class Server:
    """A minimal HTTP/1.1 server: ``routes`` maps a path to ``async handler(writer)``; every request's
    path is recorded in ``hits``, bytes of streamed bodies in ``sent``."""

    def __init__(self) -> None:
        self.routes: dict[str, object] = {}
        self.hits: list[str] = []
        self.sent = 0
        self.handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.handlers:  # stalled handlers end with the test
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _handle(self, reader, writer) -> None:
        self.handlers.add(asyncio.current_task())
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            path = line.split(b" ")[1].decode()
            self.hits.append(path)
            await self.routes[path](writer)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError, IndexError):
            pass
        finally:
            writer.close()


def head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(body: bytes, status: str = "200 OK", content_type: str = "image/png", **extra: str):
    async def handler(writer) -> None:
        writer.write(head(status, {"Content-Type": content_type, "Content-Length": str(len(body)), **extra}) + body)
    return handler


def redirect(location: str, status: str = "302 Found"):
    return answer(b"", status=status, content_type="text/plain", Location=location)


WEB = ImageFetchSpec(allow_remote=True, fetch_timeout_s=5)


# --- web URLs, against a real local socket ---------------------------------------------------------------

async def test_fetches_each_image_once_and_concurrently():
    async with Server() as server:
        server.routes["/a.png"] = answer(PNG)
        server.routes["/b.jpg"] = answer(b"\xff\xd8jpeg", content_type="image/jpeg; charset=binary")
        request = chat(server.url("/a.png"), server.url("/b.jpg"), server.url("/a.png"))
        await resolve_images(request, WEB)
    assert data_of(request) == [PNG, b"\xff\xd8jpeg", PNG]
    assert sorted(server.hits) == ["/a.png", "/b.jpg"]  # the repeated URL is fetched once


async def test_body_past_the_cap_is_refused_without_reading_it_all():
    total = 64 * 1024 * 1024

    async def endless(writer) -> None:  # no Content-Length: only the streamed cap can stop it
        writer.write(head("200 OK", {"Content-Type": "image/png"}))
        chunk = b"\0" * 65536
        while server.sent < total:
            writer.write(chunk)
            await writer.drain()
            server.sent += len(chunk)

    async with Server() as server:
        server.routes["/big.png"] = endless
        err = await refused(chat(server.url("/big.png")), WEB.model_copy(update={"max_bytes": 1024 * 1024}))
    assert err.code == TOO_LARGE and "1048576 bytes" in err.message
    assert server.sent < total // 4


async def test_declared_length_past_the_cap_is_refused_before_the_body():
    async def liar(writer) -> None:
        writer.write(head("200 OK", {"Content-Type": "image/png", "Content-Length": str(10**9)}))
        server.sent = 1
        await asyncio.sleep(30)  # the body never comes: a refusal must not wait for it

    async with Server() as server:
        server.routes["/x.png"] = liar
        err = await refused(chat(server.url("/x.png")), WEB.model_copy(update={"max_bytes": 4096}))
    assert err.code == TOO_LARGE and "1000000000 bytes" in err.message


async def test_not_an_image_names_its_content_type():
    async with Server() as server:
        server.routes["/page"] = answer(b"<html></html>", content_type="text/html; charset=utf-8")
        server.routes["/none"] = answer(b"x", content_type="")
        err = await refused(chat(server.url("/page")), WEB)
        assert err.code == FETCH_FAILED and "'text/html'" in err.message and err.param == "messages[0].content[1]"
        err = await refused(chat(server.url("/none")), WEB)
        assert "no Content-Type" in err.message


async def test_non_2xx_names_the_status():
    async with Server() as server:
        server.routes["/gone.png"] = answer(b"nope", status="404 Not Found", content_type="text/plain")
        err = await refused(chat(server.url("/gone.png")), WEB)
    assert err.code == FETCH_FAILED and "404 Not Found" in err.message


async def test_compressed_body_is_refused():
    async with Server() as server:
        server.routes["/z.png"] = answer(b"\x1f\x8b...", **{"Content-Encoding": "gzip"})
        err = await refused(chat(server.url("/z.png")), WEB)
    assert err.code == FETCH_FAILED and "gzip" in err.message


@pytest.mark.parametrize("how", ["no answer", "a byte at a time"])
async def test_timeout_covers_the_whole_fetch(how):
    async def stall(writer) -> None:
        if how == "a byte at a time":  # each read is quick: only a total deadline ends it
            writer.write(head("200 OK", {"Content-Type": "image/png", "Content-Length": "100000"}))
            for _ in range(100000):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)
        await asyncio.sleep(30)

    async with Server() as server:
        server.routes["/slow.png"] = stall
        started = time.monotonic()
        err = await refused(chat(server.url("/slow.png")), WEB.model_copy(update={"fetch_timeout_s": 0.4}))
        took = time.monotonic() - started
    assert err.code == FETCH_TIMEOUT and "0.4 s" in err.message and "127.0.0.1" in err.message
    assert 0.3 < took < 2


async def test_redirects_are_followed_and_checked():
    async with Server() as server:
        server.routes["/moved"] = redirect("/hop")  # relative, then absolute
        server.routes["/hop"] = redirect(server.url("/a.png"), status="301 Moved Permanently")
        server.routes["/a.png"] = answer(PNG)
        server.routes["/away"] = redirect(server.url("/a.png", host="localhost"))
        server.routes["/file"] = redirect("file:///etc/passwd")
        server.routes["/loop"] = redirect("/loop")
        only_here = WEB.model_copy(update={"allowed_hosts": ["127.0.0.1"], "max_redirects": 2})

        request = chat(server.url("/moved"))
        await resolve_images(request, only_here)
        assert data_of(request) == [PNG] and server.hits == ["/moved", "/hop", "/a.png"]

        server.hits.clear()
        err = await refused(chat(server.url("/away")), only_here)
        assert err.code == NOT_ALLOWED and "'localhost'" in err.message and "redirect" in err.message
        assert server.hits == ["/away"]  # the disallowed host is never asked

        err = await refused(chat(server.url("/file")), only_here)
        assert err.code == INVALID_URL

        server.hits.clear()
        err = await refused(chat(server.url("/loop")), only_here)
        assert err.code == FETCH_FAILED and "more than 2 redirects" in err.message
        assert server.hits == ["/loop"] * 3

        server.hits.clear()
        err = await refused(chat(server.url("/moved")), only_here.model_copy(update={"max_redirects": 0}))
        assert "more than 0 redirects" in err.message and server.hits == ["/moved"]


async def test_policy_refusals_come_before_any_fetch():
    async with Server() as server:
        server.routes["/a.png"] = answer(PNG)
        err = await refused(chat(server.url("/a.png")), ImageFetchSpec())
        assert err.code == NOT_ALLOWED and "does not fetch images from the web" in err.message

        err = await refused(chat(server.url("/a.png")), WEB.model_copy(update={"allowed_hosts": ["*.example.com"]}))
        assert err.code == NOT_ALLOWED and "'127.0.0.1'" in err.message

        # a later part's policy refusal wins over an earlier part's fetch: nothing is fetched
        err = await refused(chat(server.url("/a.png"), "file:///etc/passwd"), WEB)
        assert err.param == "messages[0].content[2]" and err.code == NOT_ALLOWED
    assert server.hits == []


async def test_connection_refused_is_a_400():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = await refused(chat(f"http://127.0.0.1:{port}/a.png"), WEB)
    assert err.code == FETCH_FAILED and "Could not fetch" in err.message


async def test_the_first_failing_part_is_named():
    async with Server() as server:
        server.routes["/slow.png"] = answer(b"", status="500 Internal Server Error")
        server.routes["/gone.png"] = answer(b"", status="404 Not Found")
        err = await refused(chat(server.url("/slow.png"), server.url("/gone.png")), WEB)
    assert err.param == "messages[0].content[1]" and "500" in err.message


def test_host_patterns():
    assert host_allowed("anything.test", [])
    assert host_allowed("img.example.com", ["*.example.com"])
    assert host_allowed("a.b.example.com", ["*.example.com"])
    assert host_allowed("IMG.Example.com.", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("badexample.com", ["*.example.com"])
    assert host_allowed("example.com", ["example.com"])
    assert not host_allowed("img.example.com", ["example.com"])
    assert host_allowed("::1", ["[::1]"])


# --- data URLs ------------------------------------------------------------------------------------------

async def test_data_url_size_bound():
    policy = ImageFetchSpec(max_bytes=3000)
    fits = "data:image/png;base64," + base64.b64encode(b"\0" * 3000).decode()
    over = "data:image/png;base64," + base64.b64encode(b"\0" * 3001).decode()
    request = chat(fits)
    await resolve_images(request, policy)
    assert data_of(request) == [None]  # left for the replica to decode
    err = await refused(chat(fits, over), policy)
    assert err.code == TOO_LARGE and err.param == "messages[0].content[2]" and "3000 bytes" in err.message


# --- file URLs ------------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "cat.png").write_bytes(PNG)
    (outside / "key.png").write_bytes(b"secret")
    os.symlink(outside / "key.png", root / "out.png")
    os.symlink(root / "sub" / "cat.png", root / "in.png")
    os.symlink(outside, root / "escape")
    (root / "big.png").write_bytes(b"\0" * 5000)
    os.mkfifo(root / "pipe.png")
    return root, outside


async def test_file_under_root_is_read(tree):
    root, _ = tree
    policy = ImageFetchSpec(file_root=str(root))
    request = chat(f"file://{root}/sub/cat.png", f"file://{root}/in.png", f"file://localhost{root}/sub/c%61t.png")
    await resolve_images(request, policy)
    assert data_of(request) == [PNG, PNG, PNG]


@pytest.mark.parametrize("name, code, words", [
    ("../secret/key.png", NOT_ALLOWED, "not in the directory"),
    ("out.png", NOT_ALLOWED, "not in the directory"),       # a symlink out of the root
    ("escape/key.png", NOT_ALLOWED, "not in the directory"),  # through a linked directory
    ("missing.png", INVALID_URL, "does not exist"),
    ("sub", INVALID_URL, "not a regular file"),
    ("pipe.png", INVALID_URL, "not a regular file"),         # opened without blocking
    ("big.png", TOO_LARGE, "5000 bytes"),
])
async def test_file_refusals(tree, name, code, words):
    root, outside = tree
    err = await refused(chat(f"file://{root}/{name}"), ImageFetchSpec(file_root=str(root), max_bytes=4096))
    assert err.code == code and words in err.message
    assert str(outside) not in err.message.replace(f"file://{root}/{name}", "")  # the real path is not shown


async def test_file_urls_need_a_root_and_an_absolute_path(tree):
    root, _ = tree
    err = await refused(chat(f"file://{root}/sub/cat.png"), ImageFetchSpec())
    assert err.code == NOT_ALLOWED and "reads no image files" in err.message
    err = await refused(chat("file://server/share/cat.png"), ImageFetchSpec(file_root=str(root)))
    assert err.code == INVALID_URL


# --- wiring: the policy from the app, the request that is sent ------------------------------------------

def test_policy_comes_from_the_app_settings():
    policy = ImageFetchSpec(allow_remote=True, allowed_hosts=["img.test"])
    app = SimpleNamespace(state=SimpleNamespace(settings=IngressSpec(images=policy)))
    assert image_policy(SimpleNamespace(app=app)) is policy
    bare = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace()))
    assert image_policy(bare) == ImageFetchSpec()


async def test_screen_resolves_the_request_that_is_sent(tree):
    from app.protocol.tokenize import TokenizeRequest
    from app.serving.chat import CHAT
    from app.serving.completions import COMPLETIONS
    from app.serving.tokenize import DETOKENIZE, TOKENIZE

    root, _ = tree
    inbound = Inbound(model="m", payload={}, images=ImageFetchSpec(file_root=str(root)))
    url = f"file://{root}/sub/cat.png"

    body = chat(url)
    await CHAT.screen(body, inbound, None, None)
    assert data_of((await CHAT.args(body, inbound, None))[0]) == [PNG]

    parts = [{"type": "image_url", "image_url": {"url": url}}]
    body = TokenizeRequest(model="m", messages=[{"role": "user", "content": parts}])
    await TOKENIZE.screen(body, inbound, None, None)
    sent = (await TOKENIZE.args(body, inbound, None))[0]
    assert data_of(sent.chat_request()) == [PNG]

    with pytest.raises(InvalidRequest) as caught:  # the default policy refuses file URLs
        await CHAT.screen(chat(url), Inbound(model="m", payload={}), None, None)
    assert caught.value.code == NOT_ALLOWED

    # requests without images pass untouched
    await COMPLETIONS.screen(COMPLETIONS.request_model(model="m", prompt="hi"), inbound, None, None)
    await DETOKENIZE.screen(DETOKENIZE.request_model(model="m", tokens=[1]), inbound, None, None)


async def test_responses_screen_resolves_the_chat_request_it_sends(tree):
    from app.serving.responses import RESPONSES

    root, _ = tree
    inbound = Inbound(model="m", payload={}, images=ImageFetchSpec(file_root=str(root)))
    content = [{"type": "input_text", "text": "look"},
               {"type": "input_image", "image_url": f"file://{root}/sub/cat.png"}]
    body = RESPONSES.request_model(model="m", instructions="be brief", input=[{"role": "user", "content": content}])
    await RESPONSES.screen(body, inbound, None, None)
    sent = (await RESPONSES.args(body, inbound, None))[0]
    assert sent is RESPONSES.generation_request(body) and data_of(sent) == [PNG]

    content[1]["image_url"] = f"file://{root}/missing.png"
    body = RESPONSES.request_model(model="m", input=[{"role": "user", "content": content}])
    with pytest.raises(InvalidRequest) as caught:
        await RESPONSES.screen(body, inbound, None, None)
    # Named as a responses param: the part by its place in `input`.
    assert caught.value.param == "input[0].content[1]" and caught.value.code == INVALID_URL
    assert "messages" not in caught.value.message, caught.value.message
