"""API keys (app/auth.py, app/middleware.py): key sources, constant-time matching, and every route of the
real ingress app closed without a key except the expected open ones (/health and the playground's page)."""

from __future__ import annotations

import hmac
import re

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.auth import EVERYTHING, AuthSpec, Grant, KeyRing, parse_key_file, presented_key
from app.check import check_application
from app.ingress import api

KEY, OTHER = "sk-test-0123456789", "sk-other-abcdefgh"


def test_keys_come_from_an_env_variable_and_a_file_with_per_key_models(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\n{OTHER}  demo-chat all-MiniLM-L6-v2  # two models\n")
    ring = KeyRing.load(AuthSpec(api_keys_env="MY_KEYS", api_keys_file=str(path)),
                        environ={"MY_KEYS": f" {KEY}, sk-third-key-xyz\n"})
    assert len(ring) == 3
    assert ring.grant(KEY) is EVERYTHING and ring.grant("sk-third-key-xyz") is EVERYTHING
    assert ring.grant(OTHER) == Grant(frozenset({"demo-chat", "all-MiniLM-L6-v2"}))
    assert ring.grant(OTHER).allows("demo-chat") and not ring.grant(OTHER).allows("SmolLM2-135M-Instruct")
    for wrong in (None, "", KEY + "x", KEY[:-1], KEY.upper()):
        assert ring.grant(wrong) is None


def test_off_unless_a_source_is_named_and_never_open_when_one_is(tmp_path):
    assert KeyRing.load(AuthSpec()) is None
    with pytest.raises(ValueError, match="names no key"):
        KeyRing.load(AuthSpec(api_keys_env="MY_KEYS"), environ={})
    with pytest.raises(ValueError, match="cannot read"):
        KeyRing.load(AuthSpec(api_keys_file=str(tmp_path / "absent")))


@pytest.mark.parametrize("text, message", [
    ("short\n", "line 1: a key is 8 to 512"),
    (f"{KEY}\n{KEY} demo-chat\n", "line 2: the same key again"),
    ("sk-caf\u00e9-1234567\n", "line 1: a key is 8 to 512"),
])
def test_a_malformed_key_file_names_the_line_never_the_key(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_key_file(text)
    assert KEY not in str(caught.value)


def test_every_stored_key_is_compared_whichever_matches(monkeypatch):
    ring = KeyRing({f"sk-key-number-{i}": EVERYTHING for i in range(5)})
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for presented in ("sk-key-number-0", "sk-key-number-4", "sk-wrong-key-00"):
        calls.clear()
        ring.grant(presented)
        assert len(calls) == 5


@pytest.mark.parametrize("headers, key", [
    ({b"authorization": b"Bearer " + KEY.encode()}, KEY),
    ({b"authorization": b"bearer  " + KEY.encode() + b" "}, KEY),
    ({b"x-api-key": KEY.encode()}, KEY),
    ({b"authorization": b"Basic abc", b"x-api-key": KEY.encode()}, KEY),
    ({b"authorization": b"Bearer "}, None),
    ({}, None),
])
def test_the_key_is_read_as_the_sdks_send_it(headers, key):
    assert presented_key(headers) == key


def _routes(routes=None) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the ingress app, path parameters filled in; routers that
    FastAPI includes (the ingress class's own routes, by @serve.ingress) are walked too."""
    out = []
    for route in api.routes if routes is None else routes:
        if hasattr(route, "original_router") or not hasattr(route, "path"):
            out += _routes(getattr(route, "original_router", route).routes)
            continue
        path = re.sub(r"{[^}]+}", "x", route.path)
        out += [(m, path) for m in sorted(getattr(route, "methods", None) or {"GET"}) if m != "HEAD"]
    return out


# The routes a request without a key may reach, and why. /health: load balancers and Kubernetes probes
# send no key (without one it answers the status alone). The playground (app/playground.py): a browser's
# navigation to a page, its <script> and its <link rel=stylesheet> cannot carry an Authorization header;
# the page, script and stylesheet are the same static bytes for everyone and hold no data, and every API
# call the page makes sends the key the user typed. `/` only redirects to the page.
OPEN = {("GET", "/health"), ("GET", "/"), ("GET", "/playground"), ("GET", "/playground/playground.js"),
        ("GET", "/playground/playground.css")}


def test_every_route_but_the_expected_open_ones_refuses_a_request_without_a_valid_key(monkeypatch):
    """Walks the app's own route table (docs and the OpenAPI document included), so a route added later
    cannot be left open."""
    monkeypatch.setattr(api.state, "keyring", KeyRing({KEY: EVERYTHING}))
    routes = _routes()
    assert {p for _, p in routes} >= {"/v1/chat/completions", "/v1/models", "/v1/models/x", "/health",
                                      "/openapi.json", "/docs", "/models/x", "/tokenize"}
    assert OPEN <= set(routes)
    with TestClient(api, raise_server_exceptions=False) as client:
        for method, path in routes:
            if (method, path) in OPEN:
                continue
            for headers in ({}, {"authorization": "Bearer sk-wrong-key-00"}, {"x-api-key": OTHER}):
                resp = client.request(method, path, headers=headers, content=b"{}")
                assert resp.status_code == 401, (method, path, headers, resp.status_code)
                assert resp.headers["www-authenticate"] == "Bearer"
                error = resp.json()["error"]
                assert error["code"] == "invalid_api_key" and KEY not in resp.text, (method, path)
        # A valid key passes the door (this app has no replica behind it: the OpenAPI document is static).
        assert client.get("/openapi.json", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/openapi.json").status_code == 401
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/models"):
            pass
        assert closed.value.code == 1008


def test_the_playground_is_open_and_serves_static_files_only(monkeypatch):
    """The open playground paths (OPEN) answer without a key; anything else under them does not."""
    monkeypatch.setattr(api.state, "keyring", KeyRing({KEY: EVERYTHING}))
    with TestClient(api, raise_server_exceptions=False) as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/playground"
        for path, media_type in (("/playground", "text/html"), ("/playground/playground.js", "text/javascript"),
                                 ("/playground/playground.css", "text/css")):
            resp = client.get(path)
            assert resp.status_code == 200, path
            assert resp.headers["content-type"] == f"{media_type}; charset=utf-8"
            assert resp.headers["cache-control"] == "no-cache"
        page = client.get("/playground")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text  # no CDN, no external font
        for path in ("/playground/", "/playground/other.js", "/playground.js"):
            assert client.get(path, follow_redirects=False).status_code == 401, path
        for method in ("POST", "PUT", "DELETE"):
            assert client.request(method, "/playground").status_code == 405


def test_app_check_reports_key_sources(tmp_path, monkeypatch):
    app = {"args": {"models": [{"id": "m", "source": "demo:chat"}],
                    "ingress": {"auth": {"api_keys_env": "SERVE_KEYS", "api_keys_file": str(tmp_path / "k")}}},
           "runtime_env": {"env_vars": {"SERVE_KEYS": KEY}}}
    (tmp_path / "k").write_text("tiny\n")
    problems = {p.path.rsplit(".", 1)[-1]: p for p in check_application(app, "app")}
    assert not problems["api_keys_env"].error and "keys are then in the config" in problems["api_keys_env"].message
    assert problems["api_keys_file"].error and "line 1" in problems["api_keys_file"].message
    (tmp_path / "k").write_text(f"{KEY}\n")
    monkeypatch.setenv("SERVE_KEYS", KEY)
    del app["runtime_env"]
    assert not [p for p in check_application(app, "app") if "auth" in p.path]
