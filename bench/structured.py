"""What constrained rows cost a shared batch: chat completions with 0 %, 50 % and 100 % of the requests
under ``response_format: json_schema`` (strict), on one running server.

    python -m bench.structured --levels 32,8,1 --rounds 2 --seconds 15 [--requests N] [--mixes short,mixed]

Runs this server in-process as ``bench.embeddings`` does (``app.local.serve_locally``: the bench config's
model, contender (a)'s batching and threads, the README's serving path), so that between levels it can read
the model deployment's ``stats()`` (the engine's mask counters, :data:`COUNTERS`, when it has them: the
mask cost per constrained row and step, and the share of the time the model thread waited for masks). At
each mix and level the three fractions run on the same prompts with the same closed-loop streaming clients
(``bench.load``); their order alternates by level and round. Every request samples at temperature 1 with
its own seed (the prompt's index: the same request draws the same way at every fraction), ``max_tokens``
fixed; free requests ``ignore_eos`` (a random model under the schema does not close its JSON in 64 tokens,
so both classes run to ``max_tokens``); tokens are counted (usage), not assumed.

Reports, rounds pooled: output tokens/s overall and its ratio to 0 %; each class's (free, constrained)
tokens over the level's wall time and its per-request decode rate (tokens after the first over the time
after the first); TTFT p50 per class; tokens per request per class. Writes bench/results/structured.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.config import load_config, write_result
from bench.load import HttpDriver, RequestRecord
from bench.prompts import make_prompts

FRACTIONS = (0.0, 0.5, 1.0)

# Bounded strings and arrays, so that a random model under the grammar can close the document.
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "role", "tags", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def constrained_indices(n: int, fraction: float) -> set[int]:
    """Which of ``n`` requests are constrained: spread evenly (at 0.5, every other one)."""
    return {i for i in range(n) if int((i + 1) * fraction) > int(i * fraction)}


class StructuredDriver(HttpDriver):
    """Chat at temperature 1, seeded by the prompt's index; the prompts in ``constrained`` (by identity,
    as ``body`` sees only the messages) also carry :data:`RESPONSE_FORMAT`."""

    def __init__(self, base_url: str, model: str, prompts: list[list[dict[str, str]]],
                 constrained: set[int]) -> None:
        super().__init__(base_url, model)
        self.index = {id(p): i for i, p in enumerate(prompts)}
        self.constrained = constrained

    def body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        index = self.index[id(messages)]
        body = {**super().body(messages, max_tokens), "temperature": 1.0, "seed": index}
        if index in self.constrained:
            body["response_format"] = RESPONSE_FORMAT
        else:
            # As long as the constrained ones (whose JSON a random model does not close in max_tokens):
            # requests of unequal lengths would change how clients' turns line up, not what a row costs.
            body["ignore_eos"] = True
        return body


@dataclass
class Cell:
    """One (mix, clients, fraction): the records and wall times of every round."""

    walls: list[float] = field(default_factory=list)
    free: list[RequestRecord] = field(default_factory=list)
    constrained: list[RequestRecord] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)  # deltas of the engine's COUNTERS
    failed: list[str] = field(default_factory=list)  # errors of failed requests


def _ok(records: list[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.error is None]


def _rate(r: RequestRecord) -> float | None:
    """A request's decode rate: tokens after the first over the time after its first token."""
    if r.ttft is None or r.e2e is None or r.output_tokens < 2 or r.e2e <= r.ttft:
        return None
    return (r.output_tokens - 1) / (r.e2e - r.ttft)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


# The engine's counters (GenerationEngine.stats) read around each level, when it keeps them: constrained
# row-steps, the seconds spent computing masks, and the model thread's seconds waiting for them.
COUNTERS = ("masked_rows", "mask_seconds", "mask_wait_s")


def engine_counters(handle: Any) -> dict[str, float]:
    stats = handle.stats.remote().result()
    return {k: float(stats[k]) for k in COUNTERS if k in stats}


def run_level(base: str, model: str, prompts: list, fraction: float, clients: int, max_tokens: int,
              deadline_s: float, handle: Any, cell: Cell) -> float:
    constrained = constrained_indices(len(prompts), fraction)
    driver = StructuredDriver(base, model, prompts, constrained)
    before = engine_counters(handle)
    records, wall = asyncio.run(driver.measure(prompts, clients, max_tokens, deadline_s))
    after = engine_counters(handle)
    failed = [r.error for r in records if r.error]
    if len(failed) > len(records) // 10:
        raise RuntimeError(f"{fraction:.0%} constrained at {clients} clients: {len(failed)} failed: {failed[0]}")
    cell.failed += failed  # a few are reported, not fatal: their tokens are not counted
    cell.walls.append(wall)
    cell.free += [r for r in records if r.index not in constrained]
    cell.constrained += [r for r in records if r.index in constrained]
    for key, value in after.items():
        cell.counters[key] = cell.counters.get(key, 0.0) + value - before.get(key, 0.0)
    return sum(r.output_tokens for r in records) / wall


def table(cells: dict[tuple[str, int, float], Cell], levels: list[int]) -> str:
    kept = sorted({k for cell in cells.values() for k in cell.counters}, key=COUNTERS.index)
    labels = {"mask_seconds": "mask compute", "mask_wait_s": "model thread's wait for the masks"}
    mask_header = ("per constrained row-step: " + " / ".join(labels[k] for k in kept if k in labels)
                   if "masked_rows" in kept else "mask cost")
    lines = ["| mix | clients | constrained | tok/s | vs 0 % | tok/s free / constrained | per-request decode "
             "tok/s free / constrained | TTFT p50 free / constrained | tokens/request free / constrained "
             f"| {mask_header} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def tokens_per_s(cell: Cell) -> float:
        return sum(r.output_tokens for r in _ok(cell.free) + _ok(cell.constrained)) / sum(cell.walls)

    for (mix, c, f), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], levels.index(kv[0][1]), kv[0][2])):
        wall = sum(cell.walls)
        classes = {"free": _ok(cell.free), "constrained": _ok(cell.constrained)}
        tokens = {k: sum(r.output_tokens for r in v) for k, v in classes.items()}
        tps = tokens_per_s(cell)
        ratio = tps / tokens_per_s(cells[(mix, c, 0.0)]) if (mix, c, 0.0) in cells else None

        def pair(fn: Any, spec: str, unit: str = "") -> str:
            return " / ".join(_fmt(fn(v) if v else None, spec, unit) for v in classes.values())

        rows = cell.counters.get("masked_rows")
        mask = " / ".join(_fmt(cell.counters[k] / rows * 1e6, ".1f", " us") for k in COUNTERS[1:]
                          if k in cell.counters) if rows else "–"
        if rows and "mask_wait_s" in cell.counters:
            mask += f" ({rows:.0f} row-steps; waits {cell.counters['mask_wait_s'] / wall:.2%} of the wall)"
        lines.append(
            f"| {mix} | {c} | {f:.0%} | {tps:.0f} | {_fmt(ratio, '.2f')} | "
            + " / ".join(_fmt(tokens[k] / wall if classes[k] else None, ".0f") for k in classes) + " | "
            + pair(lambda v: _median([_rate(r) for r in v]), ".0f") + " | "
            + pair(lambda v: _median([r.ttft * 1e3 for r in v if r.ttft is not None]), ".0f", " ms") + " | "
            + pair(lambda v: statistics.mean(r.output_tokens for r in v), ".1f") + f" | {mask} |")
    return "\n".join(lines)


def probe(base: str, model: str) -> str | None:
    """None if the server takes a constrained request, else why not."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
            "response_format": RESPONSE_FORMAT}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    return None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:300]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="32,8,1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mixes", default=None, help="comma-separated mixes of bench/config.yaml (all)")
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS),
                        help="shares of constrained requests, each measured at every level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0, help="stop starting requests after this long "
                        "in one level (0: never)")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: the bench "
                        "config's requests_at(level))")
    parser.add_argument("--probe", action="store_true", help="start the server, send one constrained "
                        "request, report and exit (0: it was served)")
    opts = parser.parse_args(argv)

    config = load_config()
    levels = [int(x) for x in opts.levels.split(",")]
    fractions = [float(x) for x in opts.fractions.split(",")]
    mixes = {m: config.mixes[m] for m in (opts.mixes.split(",") if opts.mixes else config.mixes)}
    ours = config.ours
    args = {"models": [{"id": ours.model_id, "source": config.model, "task": "chat",
                        "batching": ours.batching.model_dump(), "prefill_threads": ours.prefill_threads,
                        "decode_threads": ours.decode_threads, "limits": {"max_tokens": 4096}}]}

    import ray
    from ray import serve

    from app.local import serve_locally

    base = serve_locally(args, num_cpus=ours.ray_num_cpus, env=ours.env, timeout_s=config.startup_timeout_s)
    try:
        if opts.probe:
            why = probe(base, ours.model_id)
            print("constrained request served" if why is None else f"not served: {why}")
            return 0 if why is None else 1
        handle = serve.get_deployment_handle(ours.model_id, app_name="openai")
        counters = sorted(engine_counters(handle))
        warm = make_prompts(4)
        asyncio.run(StructuredDriver(base, ours.model_id, warm, {1, 3} if max(fractions) else set())
                    .warmup(warm, 8))
        cells: dict[tuple[str, int, float], Cell] = {}
        start = time.perf_counter()
        for r in range(opts.rounds):
            for mix, spec in mixes.items():
                for c in levels:
                    prompts = make_prompts(opts.requests or config.requests_at(c), spec)
                    order = fractions if (r + levels.index(c)) % 2 == 0 else list(reversed(fractions))
                    for f in order:
                        tps = run_level(base, ours.model_id, prompts, f, c, opts.max_tokens, opts.seconds,
                                        handle, cells.setdefault((mix, c, f), Cell()))
                        print(f"round {r + 1} {mix} {c:>2} clients {f:4.0%} constrained {tps:7.1f} tok/s "
                              f"({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    note = (f" Engine counters read around each level: {', '.join(f'`{k}`' for k in counters)}."
            if counters else " The engine's stats have no mask counters: the mask cost column is empty.")
    failures = [f"{len(cell.failed)} at {mix} {c} clients {f:.0%} ({cell.failed[0]})"
                for (mix, c, f), cell in cells.items() if cell.failed]
    if failures:
        note += " Failed requests (not counted): " + "; ".join(failures) + "."
    report = (f"# Constrained rows in a shared batch\n\n`python -m bench.structured`: model `{config.model}`, "
              f"batching of contender (a), {opts.rounds} rounds pooled, max_tokens {opts.max_tokens}, temperature "
              f"1 seeded per prompt, free requests `ignore_eos`; constrained requests carry `response_format` "
              f"json_schema (strict) of bench/structured.py's SCHEMA.{note}\n\n" + table(cells, levels) + "\n")
    write_result("structured.md", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
