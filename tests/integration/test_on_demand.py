"""On-demand (multiplexed) models against the session's real Ray Serve: one replica holding 2 models of
the demo family (tests/conftest.py). Load, hit, LRU eviction by name, reload, load-once, in-use models
never evicted, forbidden names, a broken model failing alone, memory freed, /v1/models; and a second
app with 2 replicas for routing stickiness."""

from __future__ import annotations

import asyncio
import time
import urllib.parse

import openai
import pytest
import requests
from ray import serve

from tests.integration.test_chat_api import msgs
from tests.integration.test_metrics_api import ours, value, wait_for
from tests.openapi_schema import assert_valid

S1, S2, M = "demo-chat-s1", "demo-chat-s2", "demo-chat-m"
DEPLOYMENT = "on-demand"


def handle(app="openai"):
    return serve.get_deployment_handle(DEPLOYMENT, app_name=app)


def stats(app="openai"):
    return handle(app).stats.remote().result()


def counters(model, app="openai"):
    return stats(app)["counters"].get(model, {"loads": 0, "load_failures": 0, "evictions": 0, "requests": 0})


def evict_all(app="openai"):
    """Start from an empty replica (waits for streams of earlier tests to end)."""
    deadline = time.time() + 60
    while stats(app)["models"] and time.time() < deadline:
        handle(app).evict_idle.remote().result()
        time.sleep(0.1)
    assert not stats(app)["models"]


async def in_thread(fn, *args):
    """Handle calls block: async tests make them in a worker thread."""
    return await asyncio.to_thread(fn, *args)


def ask(client, model, **kw):
    kw.setdefault("max_tokens", 4)
    return client.chat.completions.create(model=model, messages=msgs("hi"), temperature=0, **kw)


def test_openai_sdk_gets_an_allowed_model_that_is_not_pinned(server, client):
    reply = client.chat.completions.with_raw_response.create(model=S1, messages=msgs("hi"), max_tokens=8)
    completion = reply.parse()
    assert completion.model == S1 and completion.choices[0].finish_reason in ("stop", "length")
    assert reply.headers["x-replica-id"] == stats()["replica_id"]
    with requests.post(f"{server}/v1/chat/completions", stream=True, timeout=60, json={
            "model": S1, "messages": msgs("hi"), "max_tokens": 4, "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.headers["x-replica-id"] == stats()["replica_id"]
    listed = requests.get(f"{server}/v1/models", timeout=30).json()
    assert_valid(listed, "ListModelsResponse")
    cards = {m["id"]: m for m in listed["data"]}
    assert (cards["demo-chat"]["status"], cards["demo-chat"]["state"]) == ("pinned", "ready")
    assert "state" not in cards[S1]  # on demand: its status says it
    assert cards[S1]["status"] == "loaded" and cards[S1]["loaded_replicas"] == 1
    assert cards["demo-bench"]["status"] == "available"
    assert cards["local-broken"]["status"] == "available" and "local-escape" not in cards
    assert "loaded_replicas" not in cards["demo-whisper"]  # pinned
    one = client.models.retrieve(S1)
    assert one.id == S1 and one.model_extra["status"] == "loaded"


def test_load_hit_evict_lru_and_reload(client, metrics_url):
    evict_all()
    before = {m: counters(m) for m in (S1, S2, M)}
    ask(client, S1)
    ask(client, S2)
    ask(client, S1)  # a hit: S1 is now more recently used than S2
    assert counters(S1)["loads"] == before[S1]["loads"] + 1
    assert stats()["lru_order"] == [S2, S1]
    ask(client, M)  # the replica is full: S2, the least recently used, goes
    assert set(stats()["models"]) == {S1, M}
    assert counters(S2)["evictions"] == before[S2]["evictions"] + 1
    ask(client, S2)  # reloaded; now S1 (used before M) goes
    assert set(stats()["models"]) == {M, S2}
    assert counters(S2)["loads"] == before[S2]["loads"] + 2
    assert counters(S1)["evictions"] == before[S1]["evictions"] + 1
    after = {m: counters(m) for m in (S1, S2, M)}
    assert all(after[m]["load_seconds"] > before[m].get("load_seconds", 0) for m in (S1, S2, M))
    # The same events as Prometheus metrics (the pool's replica has run since the session began).
    want = {(name, m): after[m][key] for m in (S1, S2, M) for name, key in (
        ("model_loads_total", "loads"), ("model_load_seconds_count", "loads"), ("model_evictions_total", "evictions"))}

    def scraped(snapshot):
        return {(name, m): value(snapshot, ours(name), model=m) for name, m in want}
    assert scraped(wait_for(metrics_url, lambda s: scraped(s) == want)) == want


async def test_concurrent_first_requests_load_once(async_client):
    await in_thread(evict_all)
    before = (await in_thread(counters, S2))["loads"]
    replies = await asyncio.gather(*(async_client.chat.completions.create(
        model=S2, messages=msgs(f"hi {i}"), max_tokens=4) for i in range(20)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert (await in_thread(counters, S2))["loads"] == before + 1


async def test_a_model_in_use_is_never_evicted(async_client):
    """A long stream on M survives a burst of requests for S1 and S2 on a 2-model replica."""
    await in_thread(evict_all)
    evictions = (await in_thread(counters, M))["evictions"]
    turns = [(await in_thread(counters, m))["evictions"] for m in (S1, S2)]
    stream = await async_client.chat.completions.create(
        model=M, messages=msgs("hi"), max_tokens=230, n=8, temperature=0, stream=True)
    chunks = [await anext(stream)]  # the stream is under way: M is loaded and in use
    burst = await asyncio.gather(*(async_client.chat.completions.create(
        model=model, messages=msgs("hi"), max_tokens=4) for model in [S1, S2, S1, S2, S1, S2]))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in burst)
    # Still in flight after the burst, so it was in use all through it; and it was not evicted.
    assert (await in_thread(stats))["models"][M]["in_flight"] >= 1, "the stream ended too soon to tell"
    chunks += [c async for c in stream]
    finished = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len({c.index for c in finished}) == 8 and all(c.finish_reason in ("stop", "length") for c in finished)
    assert (await in_thread(counters, M))["evictions"] == evictions
    # S1 and S2 took turns in the one place M left free.
    assert [(await in_thread(counters, m))["evictions"] for m in (S1, S2)] != turns


FORBIDDEN = ["../../etc/passwd", "/etc/passwd", "~", "~root/x", "http://evil.example/x", "file:///etc",
             "demo-chat/../../x", "local-escape/..", "a/b/c", "x\x00y", "C:\\x", "x" * 300, "demo-nope",
             "Qwen/Qwen2.5-0.5B-Instruct", "local-escape"]


def test_forbidden_names_are_404_and_touch_nothing(server, client):
    before = stats()
    for name in FORBIDDEN:
        resp = requests.post(f"{server}/v1/chat/completions", timeout=30,
                             json={"model": name, "messages": msgs("hi")})
        if name == "local-escape":  # allowed by name; refused at load as it leads out of the root
            assert resp.status_code == 500 and resp.json()["error"]["code"] == "model_load_failed", resp.text
            assert "outside the models root" in resp.json()["error"]["message"]
            continue
        assert resp.status_code == 404, (name, resp.text)
        assert resp.json()["error"]["code"] == "model_not_found"
        assert_valid(resp.json(), "ErrorResponse")
        quoted = urllib.parse.quote(name, safe="")
        assert requests.get(f"{server}/v1/models/{quoted}", timeout=30).status_code == 404, name
    after = stats()
    touched = set(after["counters"]) - set(before["counters"])
    assert touched <= {"local-escape"}, touched  # no other name reached the replica


async def test_a_broken_model_fails_alone_and_is_retried(server, async_client):
    await in_thread(evict_all)
    failures = (await in_thread(counters, "local-broken"))["load_failures"]
    serving = asyncio.create_task(async_client.chat.completions.create(
        model=S1, messages=msgs("hi"), max_tokens=100, temperature=0))
    with pytest.raises(openai.InternalServerError) as err:
        await async_client.chat.completions.create(model="local-broken", messages=msgs("hi"), max_tokens=4)
    body = err.value.body
    assert body["code"] == "model_load_failed" and "local-broken" in body["message"]
    assert "Traceback" not in body["message"]
    good = await serving
    assert good.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.InternalServerError):  # not cached as loaded, not cached as failed
        await async_client.chat.completions.create(model="local-broken", messages=msgs("hi"), max_tokens=4)
    assert (await in_thread(counters, "local-broken"))["load_failures"] == failures + 2
    models = (await in_thread(stats))["models"]
    assert "local-broken" not in models and S1 in models
    resp = await asyncio.to_thread(requests.post, f"{server}/v1/chat/completions", timeout=30, json={
        "model": "local-broken", "messages": msgs("hi"), "stream": True})
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "model_load_failed"


def test_eviction_frees_the_memory(client):
    evict_all()
    ask(client, M)
    loaded = stats()
    weights = loaded["models"][M]["bytes"]
    assert weights > 100e6
    ask(client, S1)
    ask(client, S2)  # M, the least recently used, goes
    freed = stats()
    assert M not in freed["models"]
    assert loaded["rss_bytes"] - freed["rss_bytes"] > 0.7 * weights, (loaded["rss_bytes"], freed["rss_bytes"])


STICKY_APP = {"on_demand": {"allow": [{"pattern": "demo-chat-s*", "source": "demo"}],
                            "max_models_per_replica": 2}}


@pytest.fixture(scope="module")
def sticky_app(server):
    from app.builder import compose_app

    serve.run(compose_app(STICKY_APP, {
        DEPLOYMENT: {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
        "OpenAIIngress": {"ray_actor_options": {"num_cpus": 0.1}}}), name="sticky", route_prefix="/sticky")
    yield f"{server}/sticky"
    serve.delete("sticky")


def test_requests_for_a_model_stay_on_the_replica_that_holds_it(sticky_app):
    def replica_of(model):
        resp = requests.post(f"{sticky_app}/v1/chat/completions", timeout=120,
                             json={"model": model, "messages": msgs("hi"), "max_tokens": 2})
        assert resp.status_code == 200, resp.text
        return resp.headers["x-replica-id"]

    first = replica_of(S1)
    assert [replica_of(S1) for _ in range(6)] == [first] * 6
    other = replica_of(S2)  # no replica holds S2: Ray picks the one holding fewer models
    assert other != first
    assert [replica_of(S2) for _ in range(4)] == [other] * 4
    cards = {m["id"]: m for m in requests.get(f"{sticky_app}/v1/models", timeout=30).json()["data"]}
    assert cards[S1]["loaded_replicas"] == 1 and cards[S2]["loaded_replicas"] == 1


async def test_requests_for_two_models_at_once_match_each_alone(async_client):
    """Each model has its own engine: a batch never mixes models, so outputs do not depend on what the
    other model is serving meanwhile (greedy)."""
    async def answer(model, prompt):
        r = await async_client.chat.completions.create(model=model, messages=msgs(prompt), max_tokens=16,
                                                       temperature=0)
        return r.choices[0].message.content

    prompts = ["hi", "one two", "Paris is the capital of"]
    alone = {(m, p): await answer(m, p) for m in (S1, S2) for p in prompts}
    together = await asyncio.gather(*(answer(m, p) for m in (S1, S2) for p in prompts))
    assert dict(zip(alone, together)) == alone
    assert alone[(S1, "hi")] != alone[(S2, "hi")]  # two different models answered
