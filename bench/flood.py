"""Overload benchmark: flood ``demo-chat`` at 1x, 3x and 10x its capacity and tabulate what happens.

Starts a private Ray + Serve on 127.0.0.1 (as tests/conftest.py does: ``ray.init(address="local")``, a free
port, ``compose_app``) serving only the demo chat model with a small ``max_ongoing_requests`` /
``max_queued_requests``; capacity = their sum (requests in the system at once). For each level, ``level x
capacity`` workers each run a closed loop of requests (half streamed, greedy, a few prompts) for
``--duration`` seconds; a worker sends its next request as soon as its previous one is answered, 503s
included (no back-off: a flood). Then one normal request measures recovery. Only 127.0.0.1 is contacted.

    python -m bench.flood                     # writes bench/results/flood.md
    python -m bench.flood --levels 1,10 --duration 5 --out /tmp/flood.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo-chat"
PROMPTS = ["hi", "Paris is the capital of", "one two three", "def add(a, b):"]


def start_server(max_ongoing: int, max_queued: int, num_cpus: int) -> str:
    from app.local import serve_locally

    args = {"models": [{"id": MODEL, "source": "demo:chat", "task": "chat",
                        "batching": {"max_batch_size": min(8, max_ongoing), "batch_wait_timeout_s": 0.05,
                                     "max_running_rows": 32},
                        "limits": {"default_max_tokens": 16, "max_tokens": 512, "max_context_len": 256}}]}
    options = {MODEL: {"max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
                       "ray_actor_options": {"num_cpus": 1}}}
    return serve_locally(args, options, num_cpus=num_cpus)


def stop_server() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


async def request(http, url: str, prompt: str, stream: bool, max_tokens: int) -> tuple[int, float, int]:
    """One chat request: (status, latency s, completion tokens); status 0 = transport error/timeout."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    start = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body) as r:
            raw = await r.aread()
    except Exception:  # noqa: BLE001 - counted as status 0
        return 0, time.perf_counter() - start, 0
    latency, tokens = time.perf_counter() - start, 0
    if r.status_code == 200:
        try:
            if stream:
                for block in raw.decode().split("\n\n"):
                    if block.startswith("data: {"):
                        event = json.loads(block[6:])
                        if "error" in event:
                            return -1, latency, 0  # an error frame inside a 200 stream
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
            else:
                tokens = json.loads(raw)["usage"]["completion_tokens"]
        except (ValueError, KeyError):
            return -1, latency, 0
    return r.status_code, latency, tokens


def pct(values: list[float], q: float) -> float | None:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else None


async def flood(base: str, concurrency: int, duration_s: float, max_tokens: int) -> dict:
    import httpx

    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    results: list[tuple[int, float, int]] = []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, connect=30)) as http:
        start = time.perf_counter()
        stop_at = start + duration_s

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < stop_at:
                results.append(await request(http, url, PROMPTS[(w + i) % len(PROMPTS)], bool((w + i) % 2),
                                             max_tokens))
                i += 1

        # Bounded: workers stop starting requests at stop_at, and each request has a 60 s timeout.
        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(concurrency))), duration_s + 90)
        elapsed = time.perf_counter() - start
        # Recovery: the first normal request after the flood.
        status, latency, _ = await request(http, url, PROMPTS[0], False, max_tokens)
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    return {"concurrency": concurrency, "elapsed": elapsed, "requests": len(results), "ok": len(ok),
            "shed": len(shed), "other": dict(Counter(r[0] for r in results if r[0] not in (200, 503))),
            "rps": len(ok) / elapsed, "tps": sum(r[2] for r in ok) / elapsed,
            "ok_p50": pct([r[1] for r in ok], .5), "ok_p99": pct([r[1] for r in ok], .99),
            "shed_p50": pct([r[1] for r in shed], .5), "shed_p99": pct([r[1] for r in shed], .99),
            "recovery": (status, latency)}


def table(rows: list[dict], capacity: int) -> str:
    def s(v):
        return "–" if v is None else f"{v:.2f}"

    lines = ["| offered concurrency | requests | 200 | 503 | other | 200/s | output tok/s | 200 p50 / p99 (s) "
             "| 503 p50 / p99 (s) | recovery (status, latency) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        other = ", ".join(f"{k}: {v}" for k, v in sorted(r["other"].items())) or "0"
        lines.append(
            f"| {r['concurrency']} ({r['concurrency'] // capacity}x) | {r['requests']} | {r['ok']} | {r['shed']} "
            f"| {other} | {r['rps']:.1f} | {r['tps']:.0f} | {s(r['ok_p50'])} / {s(r['ok_p99'])} "
            f"| {s(r['shed_p50'])} / {s(r['shed_p99'])} | {r['recovery'][0]}, {r['recovery'][1]:.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,3,10", help="offered concurrency as multiples of capacity")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of flood per level")
    parser.add_argument("--max-ongoing", type=int, default=8, help="demo-chat max_ongoing_requests")
    parser.add_argument("--max-queued", type=int, default=8, help="demo-chat max_queued_requests")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs the private Ray instance declares")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "flood.md"))
    opts = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    capacity = opts.max_ongoing + opts.max_queued
    base = start_server(opts.max_ongoing, opts.max_queued, opts.num_cpus)
    rows = []
    try:
        for level in (int(x) for x in opts.levels.split(",")):
            row = asyncio.run(flood(base, level * capacity, opts.duration, opts.max_tokens))
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        stop_server()
    command = "python -m bench.flood" + ("" if argv is None and len(sys.argv) == 1 else
                                         " " + " ".join(argv if argv is not None else sys.argv[1:]))
    text = (f"# Overload (flood)\n\n`{command}` — demo-chat with max_ongoing_requests={opts.max_ongoing}, "
            f"max_queued_requests={opts.max_queued} (capacity {capacity}), {opts.duration:g} s per level, "
            f"closed-loop workers without back-off, half streamed, greedy, max_tokens={opts.max_tokens}; "
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, client and server on the same "
            f"machine. \"other\": 0 = transport error or timeout, -1 = error frame inside a 200 stream.\n\n"
            f"{table(rows, capacity)}\n")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
