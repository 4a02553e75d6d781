"""A model name is matched exactly everywhere (issue "Reliability under abuse"): ``demo-chat`` followed by
a newline (or any other character) is no name of ``demo-chat``, on every route, pinned or on demand.

The routes are the real ingress app's (``app.ingress.api``: its path patterns, middleware and error
handlers) over a bare :class:`OpenAIIngress` with fake model handles; no Ray.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from starlette.routing import compile_path

from app.allowlist import resolve_allowed, valid_name
from app.config import (ChatModelSpec, EmbeddingModelSpec, FillMaskModelSpec, IngressSpec, OnDemandSpec,
                        TranscriptionModelSpec)
from app.ingress import OpenAIIngress, api
from tests.openapi_schema import assert_valid
from tests.unit.fake_ingress import OpenDoor

ON_DEMAND = OnDemandSpec(allow=[{"pattern": "demo-*", "source": "demo"}, {"pattern": "org/exact-id"}])
PINNED = [ChatModelSpec(id="demo-chat", source="unused"),
          EmbeddingModelSpec(id="demo-embed", source="unused", task="embedding"),
          TranscriptionModelSpec(id="demo-whisper", source="unused", task="transcription"),
          FillMaskModelSpec(id="demo-fill-mask", source="unused", task="fill-mask")]
# What a client may append to a served name: none of it names the model.
# (A literal "%0A" is left to the integration test: Starlette's TestClient decodes the path a second time.)
NOT_A_NAME = ["\n", "\r\n", "\r", "\t", " ", "\x00", "\n\n", "/"]


class NoCall:
    """A model handle that must never be called: every request here is refused before the model."""

    def options(self, **kwargs):
        return self

    def __getattr__(self, name):
        raise AssertionError(f"the model was called ({name})")


@pytest.fixture
def http(monkeypatch):
    user_class = OpenAIIngress.func_or_class.__mro__[1]  # under Serve's wrapper (whose __del__ is async)
    ingress = user_class.__new__(user_class)
    ingress._specs = {spec.id: spec for spec in PINNED}
    ingress._handles = {spec.id: NoCall() for spec in PINNED}
    ingress._on_demand, ingress._multiplexed, ingress._directory = ON_DEMAND, NoCall(), None
    ingress._created, ingress._context_lens = 0, {spec.id: 1024 for spec in PINNED}
    ingress.settings, ingress.availability = IngressSpec(), OpenDoor()
    monkeypatch.setattr(api.state, "ingress", ingress, raising=False)
    # Ray Serve's class-based views find their instance through the replica context.
    monkeypatch.setattr("ray.serve.get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    return TestClient(api, raise_server_exceptions=False)


def not_found(resp, model: str) -> None:
    assert resp.status_code == 404, (model, resp.status_code, resp.text)
    assert_valid(resp.json(), "ErrorResponse")
    error = resp.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model", error
    assert f"'{model}'" in error["message"]


def path_of(model: str) -> str:
    return quote(model, safe="/")


@pytest.mark.parametrize("model", ["demo-chat", "demo-chat-s1", "org/exact-id"])
def test_a_served_name_is_found(http, model):
    resp = http.get(f"/v1/models/{path_of(model)}")
    assert resp.status_code == 200 and resp.json()["id"] == model, resp.text


@pytest.mark.parametrize("suffix", NOT_A_NAME, ids=ascii)
@pytest.mark.parametrize("model", ["demo-chat", "demo-chat-s1", "org/exact-id"])
def test_the_model_card_route_takes_the_whole_name(http, model, suffix):
    name = model + suffix
    not_found(http.get(f"/v1/models/{path_of(name)}"), name)


@pytest.mark.parametrize("suffix", NOT_A_NAME, ids=ascii)
def test_the_pipeline_route_takes_the_whole_name(http, suffix):
    name = "demo-fill-mask" + suffix
    not_found(http.post(f"/models/{path_of(name)}", json={"inputs": "a [MASK]"}), name)


@pytest.mark.parametrize("suffix", NOT_A_NAME + ["\u2028", "\x85"], ids=ascii)
@pytest.mark.parametrize("model", ["demo-chat", "demo-chat-s1"])
def test_body_routes_take_the_whole_name(http, model, suffix):
    name = model + suffix
    for route, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"prompt": "hi"}), ("/v1/responses", {"input": "hi"}),
                        ("/tokenize", {"prompt": "hi"}), ("/v1/embeddings", {"input": "hi"})]:
        not_found(http.post(route, json={"model": name, **body}), name)
    for route in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        not_found(http.post(route, data={"model": name}, files={"file": ("a.wav", b"RIFF", "audio/wav")}),
                  name)


@pytest.mark.parametrize("name", ["demo-chat\n", "demo-chat\r\n", "demo-chat ", "\ndemo-chat", "demo-chat\x00",
                                  "org/exact-id\n", "Demo-chat", "demo-chat/", "demo-cha", "demo-chat\u2028"])
def test_the_on_demand_gate_is_exact(name):
    assert resolve_allowed(ON_DEMAND, name) is None
    for served in ("demo-chat", "org/exact-id"):
        assert valid_name(served) and resolve_allowed(ON_DEMAND, served).id == served


def test_every_route_pattern_matches_whole_paths_only():
    """Every path parameter of the app takes a trailing newline into its value (Starlette's ``$`` would
    otherwise let the route match without it), so no route names a shorter model than the path does."""
    for template in ("/v1/models/{model:exactpath}", "/models/{model:exactpath}"):
        regex, _, convertors = compile_path(template)
        match = regex.match(template.split("{")[0] + "demo-chat\n")
        assert match and convertors["model"].convert(match["model"]) == "demo-chat\n"
    assert re.fullmatch(r"[^/]+", "abc\n")  # Starlette's str convertor already takes a newline
