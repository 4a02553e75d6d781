"""A model with no replica answers 503 model_unavailable at once; a bad live user_config stops nothing."""

import threading
import time

import pytest
import ray
import requests
from ray import serve

from tests.integration.test_chat_api import msgs
from tests.openapi_schema import assert_valid

# A second application in the same Serve instance, deployed from a config the way `serve deploy` does
# (the controller's apply_config): one healthy model and one whose load always fails. Ray retries the
# broken replica 3 times (a fresh worker each, a few seconds of CPU), then marks it DEPLOY_FAILED.
SIDE_BATCHING = {"max_batch_size": 4, "batch_wait_timeout_s": 0.0, "max_running_rows": 16}


def side_config(user_config=None):
    from app.local import ROOT

    return {"applications": [{
        "name": "side", "route_prefix": "/side", "import_path": "app.builder:build_app",
        "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}},
        "args": {"models": [
            {"id": "side-chat", "source": "demo:chat", "batching": SIDE_BATCHING,
             "limits": {"default_max_tokens": 4}},
            {"id": "broken-chat", "source": "/nonexistent/model-dir"}]},
        "deployments": [
            {"name": "side-chat", "max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.25},
             "user_config": user_config or SIDE_BATCHING},
            {"name": "broken-chat", "ray_actor_options": {"num_cpus": 0.1}},
            {"name": "OpenAIIngress", "ray_actor_options": {"num_cpus": 0.1}}]}]}


def serve_deploy(config):
    """What `serve deploy config.yaml` asks of the controller (through the dashboard's REST API)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def chat(base, model, **extra):
    started = time.monotonic()
    resp = requests.post(f"{base}/v1/chat/completions", timeout=60,
                         json={"model": model, "messages": msgs("hi"), "max_tokens": 4, **extra})
    return resp, time.monotonic() - started


@pytest.fixture(scope="module")
def side(server):
    serve_deploy(side_config())
    yield f"{server}/side"
    serve.delete("side")


def wait_health(base, done, timeout=120.0):
    """Poll /health until ``done(status, body)``; return the last (status, body)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            resp = requests.get(f"{base}/health", timeout=10)
            last = (resp.status_code, resp.json())
            if done(*last):
                return last
        except requests.RequestException as exc:  # the app's proxy route is not up yet
            last = (None, repr(exc))
        assert time.monotonic() < deadline, f"/health never got there: {last}"
        time.sleep(0.5)


def test_a_model_whose_load_fails_answers_503_naming_the_reason_while_others_serve(side):
    wait_health(side, lambda s, b: s is not None and "models" in b)  # the app's ingress is up
    # While Ray still tries to start it: a prompt 503, not a request queued for minutes.
    resp, took = chat(side, "broken-chat")
    assert resp.status_code == 503 and took < 5, (took, resp.text)
    assert resp.json()["error"]["code"] == "model_unavailable"

    status, body = wait_health(side, lambda s, b: b["models"]["side-chat"]["state"] == "ready"
                               and b["models"]["broken-chat"]["last_failure"])
    assert status == 503
    assert_valid(body, "ErrorResponse")
    assert body["error"]["code"] == "not_ready" and "broken-chat" in body["error"]["message"]
    broken, ok = body["models"]["broken-chat"], body["models"]["side-chat"]
    assert broken["state"] in ("starting", "unavailable") and broken["running_replicas"] == 0
    assert broken["last_failure"] == "SourceError: model directory '/nonexistent/model-dir' does not exist"
    assert "File " not in (broken["reason"] or "")  # no traceback
    assert (ok["running_replicas"], ok["config_error"]) == (1, None)

    for extra in ({}, {"stream": True}):
        resp, took = chat(side, "broken-chat", **extra)
        assert resp.status_code == 503 and took < 5, (took, resp.text)
        assert resp.headers["Retry-After"] == "1"
        error = resp.json()
        assert_valid(error, "ErrorResponse")
        assert (error["error"]["code"], error["error"]["param"]) == ("model_unavailable", "model")
        assert "SourceError: model directory '/nonexistent/model-dir' does not exist" in \
            error["error"]["message"]
        resp, _ = chat(side, "side-chat", **extra)  # the other model of the same app keeps serving
        assert resp.status_code == 200, resp.text

    # Once Ray gives up (DEPLOY_FAILED) the answer stays the same 503.
    status, body = wait_health(side, lambda s, b: b["models"]["broken-chat"]["state"] == "unavailable")
    assert body["models"]["broken-chat"]["status"] == "DEPLOY_FAILED"
    resp, took = chat(side, "broken-chat")
    assert (resp.status_code, resp.json()["error"]["code"]) == (503, "model_unavailable") and took < 5


def test_the_ingress_reads_serve_status_s_view_at_a_fraction_of_its_cost(side, monkeypatch):
    """The ingress reads the controller's details dict, not ``serve.status()`` (which spends about 20 ms
    of CPU a call building pydantic models): the same status, message and replica counts per deployment,
    for a healthy and a failed one; a dict of another shape falls back to ``serve.status()``."""
    from ray.serve.context import _get_global_client

    from app.availability import model_state, read_serve_status

    wait_health(side, lambda s, b: b["models"]["broken-chat"]["state"] == "unavailable")

    def public_view():
        return serve.status().applications["side"].deployments

    def same(view, public):
        assert set(view) == set(public) == {"side-chat", "broken-chat", "OpenAIIngress"}
        for name, ray_view in public.items():
            mine = view[name]
            assert str(getattr(mine.status, "value", mine.status)) == ray_view.status.value
            assert (dict(mine.replica_states), mine.message) == (dict(ray_view.replica_states), ray_view.message)
            assert model_state(name, mine) == model_state(name, ray_view)

    same(read_serve_status("side"), public_view())
    assert model_state("broken-chat", read_serve_status("side")["broken-chat"]).status == "DEPLOY_FAILED"
    assert read_serve_status("no-such-app") == {}

    client = _get_global_client()
    details, odd = client.get_serve_details, iter([{"applications": {"side": {"deployments": {"side-chat": {}}}}}])
    monkeypatch.setattr(client, "get_serve_details", lambda: next(odd, None) or details())  # odd once
    same(read_serve_status("side"), public_view())
    assert next(odd, None) is None  # the odd dict was read, and serve.status() answered instead


def test_health_lists_every_model_ready(server):
    """Every pinned model, and the on-demand deployment (under its deployment name)."""
    resp = requests.get(f"{server}/health", timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok"
    assert {m: (s["state"], s["running_replicas"], s["config_error"]) for m, s in body["models"].items()} == {
        "demo-chat": ("ready", 1, None), "demo-whisper": ("ready", 1, None), "all-MiniLM-L6-v2": ("ready", 1, None),
        "demo-fill-mask": ("ready", 1, None), "SmolLM2-135M-Instruct": ("ready", 1, None),
        "demo-vlm": ("ready", 1, None), "on-demand": ("ready", 1, None)}


def replica_names(deployment, app):
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"))


def wait_stats(handle, done, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not done(stats := handle.stats.remote().result()):
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    return stats


def test_serve_deploy_of_an_invalid_user_config_keeps_the_model_serving(side):
    """`serve deploy` of user_config.max_batch_size above max_ongoing_requests (8 here): the live replica
    refuses it, keeps its settings and keeps serving; no request fails meanwhile; /health shows why."""
    handle = serve.get_deployment_handle("side-chat", app_name="side")
    before = wait_stats(handle, lambda st: True)
    replicas = replica_names("side-chat", "side")
    assert len(replicas) == 1
    outcomes, stop = [], threading.Event()

    def closed_loop():
        while not stop.is_set():
            try:
                resp = chat(side, "side-chat")[0]
                outcomes.append(resp.status_code if resp.status_code == 200 else resp.text)
            except requests.RequestException as exc:
                outcomes.append(repr(exc))

    clients = [threading.Thread(target=closed_loop) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        serve_deploy(side_config({**SIDE_BATCHING, "max_batch_size": 100}))
        refused = wait_stats(handle, lambda st: st["config_error"])
        time.sleep(1)  # keep serving for a while with the refused config in place
        models = requests.get(f"{side}/health", timeout=30).json()["models"]
    finally:
        stop.set()
        for c in clients:
            c.join()
    assert len(outcomes) > 2 and set(outcomes) == {200}, outcomes
    assert "max_ongoing_requests (8) must be >= user_config.max_batch_size (100)" in refused["config_error"]
    assert refused["batching"] == before["batching"]  # the previous settings, still applied
    assert replica_names("side-chat", "side") == replicas  # reconfigured in place, not replaced
    assert refused["tokens_generated"] > before["tokens_generated"]
    assert models["side-chat"]["state"] == "ready"
    assert models["side-chat"]["config_error"] == refused["config_error"]

    serve_deploy(side_config({**SIDE_BATCHING, "max_batch_size": 2}))  # a valid one applies and clears it
    fixed = wait_stats(handle, lambda st: st["config_error"] is None)
    assert fixed["batching"]["max_batch_size"] == 2 and replica_names("side-chat", "side") == replicas
