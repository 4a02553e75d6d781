"""Overload: flood ``demo-chat`` at ~10x its capacity and check that the server sheds load cleanly.

Capacity is what tests/conftest.py gives the chat deployment: ``max_ongoing_requests`` +
``max_queued_requests`` = 32 requests in the system at once. The test sends FLOOD (= 10x that) requests at
the same moment, streamed and not, greedy, over a few distinct prompts, and requires:

- every answer is a 200 or a 503; a 503 is an HTTP status (streamed requests included: never inside an SSE
  stream), carries ``Retry-After`` and a body valid as the OpenAI ``ErrorResponse``;
- every 200 is complete (a ``finish_reason``; ``data: [DONE]`` for a stream, with no error event) and
  correct: its text equals that of the same prompt sent alone beforehand (greedy);
- the flood really overloaded the model (some 503s) and most accepted requests were still answered fast;
- the server answers normally afterwards.

Everything is bounded in time (httpx timeouts and one overall asyncio deadline).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

from tests.conftest import TEST_DEPLOYMENT_OPTIONS
from tests.integration.test_metrics_api import ours, settled, value, wait_for
from tests.openapi_schema import assert_valid

MODEL = "demo-chat"
CAPACITY = (TEST_DEPLOYMENT_OPTIONS[MODEL]["max_ongoing_requests"]
            + TEST_DEPLOYMENT_OPTIONS[MODEL]["max_queued_requests"])
FLOOD = 10 * CAPACITY
PROMPTS = ["hi", "Paris is the capital of", "one two three", "def add(a, b):"]
MAX_TOKENS = 8
REQUEST_TIMEOUT_S = 90      # per request; an answer slower than this is a hang
FLOOD_DEADLINE_S = 150      # the whole flood
FAST_S = 20.0               # "fast" for an accepted request: queued behind at most CAPACITY others


def chat_body(prompt: str, stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream}


async def one(http: httpx.AsyncClient, url: str, prompt: str, stream: bool) -> dict:
    """Send one request; return what the checks need: status, text (200), error body (else), latency."""
    start = time.perf_counter()
    async with http.stream("POST", url, json=chat_body(prompt, stream)) as r:
        raw = await r.aread()
    out = {"prompt": prompt, "stream": stream, "status": r.status_code, "latency": time.perf_counter() - start,
           "content_type": r.headers.get("content-type", ""), "retry_after": r.headers.get("retry-after")}
    if r.status_code != 200:
        out["body"] = raw.decode(errors="replace")
        return out
    if not stream:
        body = json.loads(raw)
        assert_valid(body, "CreateChatCompletionResponse")
        out["text"], out["finish"] = body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]
        return out
    assert out["content_type"].startswith("text/event-stream"), out
    blocks = [b for b in raw.decode().split("\n\n") if b.strip()]
    assert blocks and blocks[-1] == "data: [DONE]", f"stream not terminated: {raw[-300:]!r}"
    pieces, finish = [], None
    for block in blocks[:-1]:
        assert block.startswith("data: "), block[:200]
        event = json.loads(block[len("data: "):])
        assert "error" not in event, f"error inside a 200 stream: {event}"
        assert_valid(event, "CreateChatCompletionStreamResponse")
        for choice in event["choices"]:
            pieces.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    out["text"], out["finish"] = "".join(pieces), finish
    return out


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def test_flood_at_ten_times_capacity_sheds_load_cleanly(server, metrics_url):
    url = f"{server}/v1/chat/completions"
    limits = httpx.Limits(max_connections=FLOOD + 16, max_keepalive_connections=FLOOD + 16)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        # The oracle: each prompt alone, greedy.
        expected = {}
        for prompt in PROMPTS:
            alone = await one(http, url, prompt, stream=False)
            assert alone["status"] == 200, alone
            expected[prompt] = alone["text"]

        rejections = value(settled(metrics_url), ours("overload_rejections_total"), model="demo-chat")
        start = time.perf_counter()
        async with asyncio.timeout(FLOOD_DEADLINE_S):
            results = await asyncio.gather(*(one(http, url, PROMPTS[i % len(PROMPTS)], stream=bool(i % 2))
                                             for i in range(FLOOD)))
        flood_s = time.perf_counter() - start

        ok = [r for r in results if r["status"] == 200]
        shed = [r for r in results if r["status"] == 503]
        other = [r for r in results if r["status"] not in (200, 503)]
        summary = (f"{len(results)} requests in {flood_s:.1f} s: {len(ok)} x 200 "
                   f"(p50 {_pct([r['latency'] for r in ok], .5):.2f} s), {len(shed)} x 503 "
                   f"(p50 {_pct([r['latency'] for r in shed], .5):.2f} s), others {[r['status'] for r in other]}")
        print(summary)
        assert not other, f"{summary}; first: {other[0]}"

        for r in shed:
            assert r["content_type"].startswith("application/json"), r
            assert r["retry_after"] is not None and r["retry_after"].isdigit(), r
            body = json.loads(r["body"])
            assert_valid(body, "ErrorResponse")
        for r in ok:
            assert r["finish"] in ("stop", "length"), r
            assert r["text"] == expected[r["prompt"]], (
                f"{'streamed' if r['stream'] else 'non-streamed'} answer to {r['prompt']!r} under load "
                f"differs from the same prompt alone: {r['text']!r} != {expected[r['prompt']]!r}")

        assert shed, f"no 503 at {FLOOD} concurrent requests, so the flood proved nothing: {summary}"
        # Each one is counted as an overload rejection (app/metrics.py), exactly once.
        overloaded = sum(json.loads(r["body"])["error"]["code"] == "overloaded" for r in shed)
        counted = lambda s: value(s, ours("overload_rejections_total"), model="demo-chat") - rejections  # noqa: E731
        assert overloaded and counted(wait_for(metrics_url, lambda s: counted(s) >= overloaded)) == overloaded
        assert len(ok) >= CAPACITY // 2, f"too few requests accepted: {summary}"
        assert any(r["stream"] for r in ok) and any(not r["stream"] for r in ok), summary
        assert any(r["stream"] for r in shed), f"no streamed request was shed: {summary}"
        fast = [r for r in ok if r["latency"] <= FAST_S]
        assert len(fast) >= 0.9 * len(ok), f"accepted requests were slow: {summary}"
        # Shedding must not wait for the queue to drain or for a timeout (90 s). How fast the ingress gets
        # through 320 simultaneous requests is the machine's: 1.6-1.8 s alone, 5.1 s once in the full
        # suite on a slow 2-core host, so the bound leaves room for that (speed is the bench's to measure).
        assert statistics.median(r["latency"] for r in shed) < 10.0, f"503s were slow: {summary}"

        # Afterwards: a normal answer, the same as before the flood.
        after = await one(http, url, PROMPTS[0], stream=True)
        assert after["status"] == 200 and after["text"] == expected[PROMPTS[0]], after
