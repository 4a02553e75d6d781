"""On-demand (multiplexed) models: cold-load time, warm TTFT, streaming during a load, and a mixed
3-model workload on a 2-model replica against a 3-model replica (how much time goes to reloads).

Starts a private local Ray Serve (app/local.py) whose only models are the demo family loaded on demand
by one multiplexed replica, then measures over HTTP (streamed, greedy):

1. cold load: for each model, the first request after evicting everything (TTFT cold) against the same
   request once loaded (TTFT warm, p50 of 5), and the pool's own load seconds;
2. inter-token gaps of a stream on a loaded model, alone and while another model loads on the replica;
3. a mixed workload: ``--requests`` requests over the 3 models in a seeded random order, ``--clients``
   closed-loop clients, on a replica holding 2 models (reloads) and one holding 3 (no reloads).

    python bench/multiplex_bench.py            # writes bench/results/multiplex.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["demo-chat-s1", "demo-chat-s2", "demo-chat-m"]
DEPLOYMENT = "on-demand"


def app_args(max_models: int) -> dict:
    return {"on_demand": {"allow": [{"pattern": "demo-*", "source": "demo",
                                     "limits": {"max_context_len": 512, "max_tokens": 400}}],
                          "max_models_per_replica": max_models}}


OPTIONS = {DEPLOYMENT: {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64}}


def stream(base: str, model: str, max_tokens: int, prompt: str = "tell me a story") -> dict:
    """One streamed request: TTFT, the arrival time of each content chunk, tokens, all from send time."""
    sent = time.perf_counter()
    times, tokens = [], 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {"sent": sent, "ttft": times[0] - sent if times else None, "times": times, "tokens": tokens,
            "e2e": time.perf_counter() - sent}


def handle():
    from ray import serve

    return serve.get_deployment_handle(DEPLOYMENT, app_name="openai")


def evict_all() -> None:
    for _ in range(100):
        handle().evict_idle.remote().result()
        if not handle().stats.remote().result()["models"]:
            return
        time.sleep(0.1)


def cold_and_warm(base: str) -> list[dict]:
    rows = []
    for model in MODELS:
        evict_all()
        before = handle().stats.remote().result()["counters"].get(model, {}).get("load_seconds", 0.0)
        cold = stream(base, model, 8)
        load_s = handle().stats.remote().result()["counters"][model]["load_seconds"] - before
        warm = [stream(base, model, 8)["ttft"] for _ in range(5)]
        weights = handle().stats.remote().result()["models"][model]["bytes"]
        rows.append({"model": model, "weights_mb": weights / 1e6, "ttft_cold_s": cold["ttft"], "load_s": load_s,
                     "ttft_warm_ms": 1000 * statistics.median(warm)})
    return rows


def gaps_ms(times: list[float], start: float = 0.0, end: float = float("inf")) -> list[float]:
    return [1000 * (b - a) for a, b in zip(times, times[1:]) if start <= a and b <= end]


def itl_during_load(base: str, steady: str, loading: str, max_tokens: int) -> dict:
    """Gaps of a stream on ``steady`` (loaded) alone, then while ``loading`` is loaded next to it."""
    evict_all()
    stream(base, steady, 4)
    alone = gaps_ms(stream(base, steady, max_tokens)["times"])
    result: dict = {}

    def run_steady():
        result["steady"] = stream(base, steady, max_tokens)

    t = threading.Thread(target=run_steady)
    t.start()
    time.sleep(0.3)  # the steady stream is under way
    cold = stream(base, loading, 4)
    t.join()
    window = (cold["sent"], cold["sent"] + cold["ttft"])
    during = gaps_ms(result["steady"]["times"], *window)
    return {"alone_p50": statistics.median(alone), "alone_max": max(alone),
            "during_p50": statistics.median(during) if during else None,
            "during_max": max(during) if during else None, "during_n": len(during),
            "load_window_s": cold["ttft"]}


def mixed(base: str, requests: int, clients: int, max_tokens: int, seed: int) -> dict:
    for model in MODELS:  # a fresh replica imports model code on its first load: not part of the run
        stream(base, model, 2)
    evict_all()
    order = random.Random(seed).choices(MODELS, k=requests)
    before = handle().stats.remote().result()["counters"]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: stream(base, m, max_tokens, "one two three"), order))
    wall = time.perf_counter() - started
    after = handle().stats.remote().result()["counters"]

    def delta(key):
        return sum(after[m][key] - before.get(m, {}).get(key, 0) for m in MODELS)

    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "req_s": requests / wall, "tok_s": tokens / wall, "loads": delta("loads"),
            "evictions": delta("evictions"), "load_s": delta("load_seconds"),
            "load_share": delta("load_seconds") / wall,
            "ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in results if r["ttft"] is not None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "multiplex.md"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from app.builder import compose_app
    from app.local import serve_locally

    base = serve_locally(app_args(2), OPTIONS)
    try:
        loads = cold_and_warm(base)
        itl = itl_during_load(base, "demo-chat-s1", "demo-chat-m", 300)
        runs = {2: mixed(base, args.requests, args.clients, args.max_tokens, args.seed)}
        serve.run(compose_app(app_args(3), OPTIONS), name="openai", route_prefix="/")
        runs[3] = mixed(base, args.requests, args.clients, args.max_tokens, args.seed)
    finally:
        serve.shutdown()
        ray.shutdown()

    lines = ["| model | weights MB | TTFT cold s | of which load s | TTFT warm ms (p50 of 5) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['weights_mb']:.1f} | {r['ttft_cold_s']:.2f} | {r['load_s']:.2f} | "
              f"{r['ttft_warm_ms']:.0f} |" for r in loads]
    lines += ["", "| stream on demo-chat-s1 | gap p50 ms | gap max ms | gaps |", "|---|---:|---:|---:|",
              f"| alone | {itl['alone_p50']:.1f} | {itl['alone_max']:.1f} | |",
              f"| while demo-chat-m loads ({itl['load_window_s']:.2f} s) | {itl['during_p50'] or 0:.1f} | "
              f"{itl['during_max'] or 0:.1f} | {itl['during_n']} |"]
    lines += ["", f"Mixed workload: {args.requests} requests over {', '.join(MODELS)} (seeded random order), "
              f"{args.clients} clients, max_tokens {args.max_tokens}.", "",
              "| models per replica | wall s | req/s | out tok/s | TTFT p50 ms | loads | evictions | load s | load s ÷ wall |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['wall_s']:.1f} | {r['req_s']:.2f} | {r['tok_s']:.0f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['loads']} | {r['evictions']} | {r['load_s']:.1f} | {100 * r['load_share']:.0f}% |"
              for n, r in runs.items()]
    text = "\n".join(lines)
    print(text)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    machine = (f"{os.cpu_count()} CPUs, shared with other jobs (noisy: compare rows of one run), no GPU; "
               f"run {time.strftime('%Y-%m-%dT%H:%M:%S')} at commit {commit}")
    Path(args.out).write_text(f"# On-demand models\n\n`python bench/multiplex_bench.py {' '.join(sys.argv[1:])}`"
                              f"\n\n{machine}.\n\n{text}\n")


if __name__ == "__main__":
    main()
