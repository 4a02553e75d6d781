"""The load generator (asyncio + httpx) and the per-level statistics.

A level runs ``concurrency`` closed-loop clients over one shared list of requests: each client takes the
next prompt, streams the chat completion to its end, and takes the next, until the list is exhausted (or
the level's deadline passes; unfinished prompts are then not started). Every request is greedy
(``temperature: 0``) with a fixed ``max_tokens`` and asks for usage, so output tokens are counted, not
assumed (a random model may stop early at an end token).

Metrics (per level): requests/s and output tokens/s over the level's wall time; TTFT = request sent to
first non-empty content chunk; ITL = gap between consecutive non-empty content chunks, *per chunk* (a
server that coalesces several tokens into one chunk shows fewer, longer gaps); end-to-end latency.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np


@dataclass
class RequestRecord:
    """What one request did, with times in seconds from when it was sent."""

    index: int
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty content chunk
    e2e: float | None = None
    output_tokens: int = 0
    tokens_from_usage: bool = False
    events: int = 0  # SSE data events received, [DONE] excluded
    error: str | None = None


@dataclass
class LevelStats:
    concurrency: int
    requests: int  # requests finished (ok or failed)
    planned: int  # requests the level meant to send
    errors: int
    wall_s: float
    output_tokens: int
    requests_per_s: float
    tokens_per_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    chunks_per_request: float | None = None  # mean content chunks per ok request (coalescing shows here)
    events_per_request: float | None = None  # mean SSE events per ok request (content or not)
    cpu_ms_per_token: dict[str, float] | None = None  # CPU ms per output token by process role (bench/cpu.py)
    rounds: int = 1  # measured rounds pooled into these figures
    tokens_counted: str = "usage"  # "usage" | "chunks" (estimate) | "generate"
    first_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` (numpy's linear interpolation), None for no values."""
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[RequestRecord], concurrency: int, planned: int, wall_s: float,
              tokens_counted: str | None = None) -> LevelStats:
    ok = [r for r in records if r.error is None]
    errors = [r for r in records if r.error is not None]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.output_tokens for r in ok)
    if tokens_counted is None:
        tokens_counted = "usage" if all(r.tokens_from_usage for r in ok) else "chunks"
    return LevelStats(
        concurrency=concurrency, requests=len(records), planned=planned, errors=len(errors),
        wall_s=wall_s, output_tokens=tokens,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50=percentile([r.ttft for r in ok if r.ttft is not None], 50),
        ttft_p99=percentile([r.ttft for r in ok if r.ttft is not None], 99),
        itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99),
        e2e_p50=percentile([r.e2e for r in ok if r.e2e is not None], 50),
        e2e_p99=percentile([r.e2e for r in ok if r.e2e is not None], 99),
        chunks_per_request=float(np.mean([len(r.chunk_times) for r in ok])) if ok else None,
        events_per_request=float(np.mean([r.events for r in ok])) if ok else None,
        tokens_counted=tokens_counted,
        first_error=errors[0].error if errors else None)


class Driver(Protocol):
    """What a started contender offers the bench: one measured level at a time."""

    tokens_counted: str | None  # how summarize() labels the token counts (None: from the records)

    async def warmup(self, prompts: list[list[dict[str, str]]], max_tokens: int) -> None: ...

    async def measure(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                      deadline_s: float = 0) -> tuple[list[RequestRecord], float]:
        """One level: the records of the requests it finished, and its wall time in seconds."""

    async def run_level(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                        deadline_s: float = 0) -> LevelStats: ...


class HttpDriver:
    """Drives an OpenAI-compatible ``/v1/chat/completions`` with streaming clients (a subclass may drive
    another route: ``route``, ``body`` and ``content`` say what it sends and reads)."""

    tokens_counted = None
    route = "/v1/chat/completions"

    def __init__(self, base_url: str, model: str, timeout_s: float = 600,
                 server_pid: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.server_pid = server_pid  # the server process, for profiling (bench/run.py --profile)

    def body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}

    def content(self, choice: dict[str, Any]) -> str | None:
        """The text a streamed choice carries."""
        return (choice.get("delta") or {}).get("content")

    async def one(self, client: httpx.AsyncClient, index: int, messages: list[dict[str, str]],
                  max_tokens: int) -> RequestRecord:
        record = RequestRecord(index)
        start = time.perf_counter()
        chunks = 0
        try:
            async with client.stream("POST", f"{self.base_url}{self.route}",
                                     json=self.body(messages, max_tokens)) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    raise RuntimeError(f"HTTP {response.status_code}: {text}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    record.events += 1
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {json.dumps(chunk['error'])[:300]}")
                    if chunk.get("usage"):
                        record.output_tokens = int(chunk["usage"]["completion_tokens"])
                        record.tokens_from_usage = True
                    for choice in chunk.get("choices") or ():
                        if self.content(choice):
                            now = time.perf_counter() - start
                            record.chunk_times.append(now)
                            if record.ttft is None:
                                record.ttft = now
                            chunks += 1
            record.e2e = time.perf_counter() - start
            if not record.tokens_from_usage:
                record.output_tokens = chunks  # an estimate: one token per chunk
        except Exception as exc:  # noqa: BLE001 - a failed request is a measured outcome
            record.error = f"{type(exc).__name__}: {exc}"[:400]
        return record

    async def measure(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                      deadline_s: float = 0) -> tuple[list[RequestRecord], float]:
        queue = list(enumerate(prompts))
        queue.reverse()
        records: list[RequestRecord] = []
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        timeout = httpx.Timeout(self.timeout_s, connect=30)
        start = time.perf_counter()
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

            async def worker() -> None:
                while queue:
                    if deadline_s and time.perf_counter() - start > deadline_s:
                        return
                    index, messages = queue.pop()
                    records.append(await self.one(client, index, messages, max_tokens))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - start

    async def warmup(self, prompts: list[list[dict[str, str]]], max_tokens: int) -> None:
        if prompts:
            records, _ = await self.measure(prompts, 1, max_tokens, 0)
            failed = [r.error for r in records if r.error]
            if failed:
                raise RuntimeError(f"warmup failed: {failed[0]}")

    async def run_level(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                        deadline_s: float = 0) -> LevelStats:
        records, wall = await self.measure(prompts, concurrency, max_tokens, deadline_s)
        return summarize(records, concurrency, len(prompts), wall)
