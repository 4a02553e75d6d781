"""A model replica dies under load: in-flight requests get clean errors, Serve replaces it, service
resumes. Runs last (file name) because it disrupts the shared server for a few seconds."""

import asyncio
import time

import httpx
import ray
import requests

from tests.integration.test_chat_api import MODEL, msgs
from tests.openapi_schema import assert_valid


def replica_actors(deployment: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]
    return [ray.get_actor(name, namespace="serve") for name in names]


async def test_killed_replica_fails_in_flight_requests_cleanly_and_is_replaced(server):
    # n=4 makes each request 4 rows, so generation is still running when the replica dies.
    body = {"model": MODEL, "messages": msgs("hi"), "max_tokens": 220, "n": 4, "temperature": 0}
    streaming = asyncio.Event()

    async def non_streamed(http):
        r = await http.post(f"{server}/v1/chat/completions", json=body)
        return ("json", r.status_code, r.json())

    async def streamed(http):
        async with http.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return ("json", r.status_code, (await r.aread()) and r.json())
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    last = line
                    streaming.set()
            return ("sse", r.status_code, last)

    [victim] = replica_actors(MODEL)
    async with httpx.AsyncClient(timeout=60) as http:
        in_flight = [asyncio.create_task(f(http)) for f in (non_streamed, streamed, non_streamed, streamed)]
        await asyncio.wait_for(streaming.wait(), timeout=60)  # generation is under way
        ray.kill(victim, no_restart=True)
        outcomes = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=60)  # none hangs

    import json
    for kind, status, payload in outcomes:
        if kind == "json":
            assert status in (200, 500, 503), payload
            if status != 200:
                assert_valid(payload, "ErrorResponse")
        else:  # the stream had started: it must end with a finished chunk or an error frame
            event = json.loads(payload[len("data: "):])
            if "error" in event:
                assert_valid(event, "ErrorResponse")
            else:
                assert event["choices"] and event["choices"][0]["finish_reason"] is not None
    assert any(status != 200 or "error" in (payload or "") for _, status, payload in outcomes)

    # Until the replacement runs, the model has no replica: each request is refused at once with a 503
    # (or one already routed to the dead replica fails with one), not held until a replica exists.
    deadline = time.time() + 90
    while time.time() < deadline:
        started = time.monotonic()
        resp = requests.post(f"{server}/v1/chat/completions", timeout=30,
                             json={"model": MODEL, "messages": msgs("hi"), "max_tokens": 4})
        if resp.status_code == 200:
            break
        assert resp.status_code == 503 and time.monotonic() - started < 5, resp.text
        assert_valid(resp.json(), "ErrorResponse")
        assert resp.json()["error"]["code"] in ("model_unavailable", "replica_unavailable")
        assert resp.headers["Retry-After"]
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    assert replica_actors(MODEL) and replica_actors(MODEL)[0] != victim
