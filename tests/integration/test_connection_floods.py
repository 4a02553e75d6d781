"""Connection floods (README: Connection limits): sockets that send nothing, half a request head or half a
body neither keep a well-behaved client out nor stay open past HAProxy's client timeout.

The session server runs Ray's fast path with HAProxy in front (``app.local.serve_locally`` sets
:data:`app.local.FAST_PATH_ENV` and :data:`app.local.CONNECTION_ENV`). Ray's generated haproxy.cfg has no
``timeout http-request``, so ``timeout client`` (``RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S``; Ray's default 3600 s)
is what closes a silent connection. The test holds a few hundred such sockets (2 CPUs: not the thousands
that fill HAProxy's 4,096 slots; once every held socket closes within the timeout, a flood beyond the cap
cannot keep a client out for longer than that), then requires:

- a normal chat request answers 200 while they are held, within the timeout;
- the server closes every held socket (idle, half head, half body) within the timeout plus some slack;
- the server answers normally afterwards (the ingress is not left holding half-read bodies).
"""

from __future__ import annotations

import selectors
import socket
import time
from urllib.parse import urlsplit

import requests

from app.local import CONNECTION_ENV

TIMEOUT_S = float(CONNECTION_ENV["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"])
SLACK_S = 5.0   # scheduling on 2 busy CPUs; HAProxy's timers are millisecond-exact
IDLE, HALF_HEAD, HALF_BODY = 200, 25, 25
HALF_HEAD_BYTES = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
HALF_BODY_BYTES = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 4000\r\n\r\n{\"model\": \"demo-chat\", \"messages\": [")
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


def hold(address: tuple[str, int], count: int, payload: bytes) -> list[socket.socket]:
    """``count`` connections, each having sent ``payload`` (nothing if empty) and then nothing more."""
    held = []
    for _ in range(count):
        s = socket.create_connection(address, timeout=10)
        if payload:
            s.sendall(payload)
        s.setblocking(False)
        held.append(s)
    return held


def wait_closed(held: dict[str, list[socket.socket]], deadline: float) -> dict[str, list[float]]:
    """Per kind, the time (monotonic) at which the server closed each socket (EOF or reset; an error
    answer such as a 408 before the close is read and ignored), waiting until ``deadline`` at most."""
    closed: dict[str, list[float]] = {kind: [] for kind in held}
    with selectors.DefaultSelector() as sel:
        for kind, sockets in held.items():
            for s in sockets:
                sel.register(s, selectors.EVENT_READ, kind)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                try:
                    if key.fileobj.recv(65536):
                        continue                      # an answer (e.g. 408); the close follows
                except BlockingIOError:
                    continue
                except OSError:                       # reset by the server
                    pass
                sel.unregister(key.fileobj)
                closed[key.data].append(time.monotonic())
    return closed


def test_idle_and_half_sent_connections_neither_keep_clients_out_nor_stay_open(server):
    url = urlsplit(server)
    address = (url.hostname, url.port)
    start = time.monotonic()
    held = {"idle": hold(address, IDLE, b""), "half head": hold(address, HALF_HEAD, HALF_HEAD_BYTES),
            "half body": hold(address, HALF_BODY, HALF_BODY_BYTES)}
    opened = time.monotonic()
    try:
        t = time.monotonic()
        r = requests.post(f"{server}/v1/chat/completions", json=CHAT, timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t < TIMEOUT_S

        closed = wait_closed(held, deadline=opened + TIMEOUT_S + SLACK_S)
        print({kind: f"{len(times)} closed, last after {max(times) - start:.1f} s" if times else "none closed"
               for kind, times in closed.items()}, f"chat: {r.elapsed.total_seconds():.2f} s")
        still_open = {kind: len(held[kind]) - len(times) for kind, times in closed.items()}
        assert not any(still_open.values()), (
            f"open {TIMEOUT_S + SLACK_S:g} s after the last connect: {still_open}")
        # Not closed for some other reason at once (e.g. refused): they were held until the timeout.
        earliest = min(t for times in closed.values() for t in times)
        assert earliest - start > TIMEOUT_S / 2, f"closed after {earliest - start:.1f} s"
    finally:
        for sockets in held.values():
            for s in sockets:
                s.close()

    r = requests.post(f"{server}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text
