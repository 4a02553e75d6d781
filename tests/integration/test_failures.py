"""How the chat path fails: deadlines, disconnects, body limits, isolation — observed, not slept on."""

import asyncio
import json
import time

import httpx
import pytest
import requests
from ray import serve

from tests.integration.test_chat_api import MODEL, msgs, sse_events
from tests.openapi_schema import assert_valid

# A second application in the same Serve instance, with a short deadline and a small body limit. Its
# deadline tests ask for 4 x 1900 tokens with ignore_eos: sampled choices that hit EOS early finished
# within the deadline once the lean decode step made the tiny model fast (about 0.9 s for 4 choices).
SHORT_APP = {
    "models": [{"id": "slow-chat", "source": "demo:chat", "task": "chat",
                "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
                "limits": {"max_tokens": 1900}}],
    "ingress": {"request_timeout_s": 0.5, "max_request_body_bytes": 4096},
}


# A third, with a long context and no short deadline: a stream that would run on for seconds.
LONG_APP = {
    "models": [{"id": "long-chat", "source": "demo:chat", "task": "chat",
                "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
                "limits": {"max_tokens": 1900}}],
}


def _serve_app(server, name, args, model):
    """Run ``args`` as a second application next to the session's; its URL prefix; deleted after."""
    from app.builder import compose_app

    serve.run(compose_app(args, {model: {"ray_actor_options": {"num_cpus": 0.25}},
                                 "OpenAIIngress": {"ray_actor_options": {"num_cpus": 0.1}}}),
              name=name, route_prefix=f"/{name}")
    yield f"{server}/{name}"
    serve.delete(name)


@pytest.fixture(scope="module")
def short_app(server):
    yield from _serve_app(server, "short", SHORT_APP, "slow-chat")


@pytest.fixture(scope="module")
def long_app(server):
    yield from _serve_app(server, "long", LONG_APP, "long-chat")


async def read_then_disconnect(server: str, body: dict, events: int = 2) -> None:
    """Stream ``body`` from the chat route and hang up after ``events`` SSE events (mid-stream). The
    default is the role chunk and the first content chunk: later chunks are paced (several tokens each),
    so waiting for more would let the stream run further before the hang-up."""
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= events:
                    return  # leaving the block closes the connection mid-stream


def stats(deployment, app="openai"):
    return serve.get_deployment_handle(deployment, app_name=app).stats.remote().result()


def wait_idle(deployment, app="openai", timeout=30.0):
    """Wait until the engine runs no rows; return its stats then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = stats(deployment, app)
        if current["running_rows"] == 0:
            return current
        time.sleep(0.05)
    raise AssertionError(f"{deployment} still busy: {current}")


def test_deadline_gives_504_and_stops_generation(short_app):
    before = wait_idle("slow-chat", "short")["tokens_generated"]
    started = time.time()
    resp = requests.post(f"{short_app}/v1/chat/completions", timeout=60, json={
        "model": "slow-chat", "messages": msgs("hi"), "max_tokens": 1900, "n": 4, "temperature": 0,
        "ignore_eos": True})
    assert resp.status_code == 504, resp.text
    assert_valid(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["code"] == "timeout"
    assert time.time() - started < 10
    after = wait_idle("slow-chat", "short")["tokens_generated"]
    time.sleep(0.5)
    assert stats("slow-chat", "short")["tokens_generated"] == after  # nothing runs on
    assert after - before < 4 * 1900


def test_deadline_mid_stream_ends_with_error_frame(short_app):
    with requests.post(f"{short_app}/v1/chat/completions", stream=True, timeout=60, json={
            "model": "slow-chat", "messages": msgs("hi"), "max_tokens": 1900, "n": 4, "ignore_eos": True,
            "stream": True}) as r:
        assert r.status_code == 200
        events, done = sse_events(r)
    assert done and events[-1]["error"]["code"] == "timeout"
    assert_valid(events[-1], "ErrorResponse")
    assert wait_idle("slow-chat", "short")["running_rows"] == 0


def test_body_over_the_limit_is_413(short_app):
    body = json.dumps({"model": "slow-chat", "messages": msgs("x" * 5000)})
    resp = requests.post(f"{short_app}/v1/chat/completions", data=body, timeout=30,
                         headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert_valid(resp.json(), "ErrorResponse")


async def test_disconnect_mid_stream_stops_generation_and_spares_neighbours(long_app):
    """Through HAProxy some hang-ups (about one in four from httpx, none from a raw socket) are seen only
    at the second stream message after them, about 2 x stream_interval_s later (README: Cancellation).
    So the quitter asks for 1900 tokens past EOS, over a second of decoding even for the tiny model:
    stopping within that window stays unmistakable."""
    async with httpx.AsyncClient(base_url=long_app, timeout=60) as http:
        async def neighbour():
            body = {"model": "long-chat", "messages": msgs("one two"), "max_tokens": 40, "temperature": 0}
            answer = (await http.post("/v1/chat/completions", json=body)).json()
            return answer["choices"][0]["message"]["content"]

        neighbour_alone = await neighbour()
        before = (await asyncio.to_thread(wait_idle, "long-chat", "long"))["tokens_generated"]
        quitter = read_then_disconnect(long_app, {"model": "long-chat", "messages": msgs("hi"),
                                                  "max_tokens": 1900, "ignore_eos": True, "temperature": 0})
        results = await asyncio.gather(neighbour(), quitter)
    assert results[0] == neighbour_alone
    after = await asyncio.to_thread(wait_idle, "long-chat", "long")
    # Had the stream run on, the engine would have made 1900 + 40 tokens.
    assert after["tokens_generated"] - before < 1000, after


async def test_failing_request_fails_alone_in_a_crowd(async_client):
    import openai

    async def ask(text, max_tokens):
        return await async_client.chat.completions.create(model=MODEL, messages=msgs(text),
                                                          max_tokens=max_tokens, temperature=0)

    results = await asyncio.gather(ask("hi", 10), ask("x " * 1100, 10), ask("one two", 10),
                                   ask("hi", 5000), ask("aaa", 10), return_exceptions=True)
    assert isinstance(results[1], openai.BadRequestError)
    assert isinstance(results[3], openai.BadRequestError)
    for ok in (results[0], results[2], results[4]):
        assert ok.choices[0].finish_reason in ("stop", "length") and ok.usage.completion_tokens >= 1


def test_every_response_carries_a_request_id(server):
    for resp in (requests.get(f"{server}/v1/models", timeout=30),
                 requests.get(f"{server}/v1/missing", timeout=30),
                 requests.post(f"{server}/v1/chat/completions", json={"model": "nope", "messages": []},
                               timeout=30)):
        assert resp.headers.get("x-request-id"), resp.headers
