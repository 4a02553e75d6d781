"""``/v1/completions`` beside ``/v1/chat/completions`` on one running server: the same engine and
batching, so the same prompts (the chat template's text sent as a completions prompt, without special
tokens: token for token what chat prefills) must decode at the same speed.

    python -m bench.completions --levels 1,8,32 --rounds 2

Starts this server as the bench's contender (a) does (``bench.serve_ours``, the bench config's model and
batching), then at each level and prompt mix drives chat and completions in turn (alternating which goes
first, round by round) with the same closed-loop streaming clients (``bench.load``), greedy, fixed
``max_tokens`` and ``ignore_eos`` so both produce the same tokens. Writes bench/results/completions.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.config import load_config, model_dir, write_result
from bench.contenders import managed_server
from bench.load import HttpDriver, LevelStats, summarize
from bench.prompts import make_prompts


class ChatDriver(HttpDriver):
    def body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        return {**super().body(messages, max_tokens), "ignore_eos": True}


class CompletionsDriver(HttpDriver):
    """The same prompts as chat, rendered with the model's chat template, sent to ``/v1/completions``."""

    route = "/v1/completions"

    def __init__(self, base_url: str, model: str, tokenizer: Any) -> None:
        super().__init__(base_url, model)
        self.tokenizer = tokenizer

    def body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return {"model": self.model, "prompt": prompt, "add_special_tokens": False, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    def content(self, choice: dict[str, Any]) -> str | None:
        return choice.get("text")


async def level(driver: HttpDriver, prompts: list, concurrency: int, max_tokens: int) -> LevelStats:
    records, wall = await driver.measure(prompts, concurrency, max_tokens)
    return summarize(records, concurrency, len(prompts), wall)


def table(results: dict[tuple[str, int], dict[str, list[LevelStats]]], levels: list[int]) -> str:
    lines = ["| mix | clients | chat tok/s | completions tok/s | ratio | chat TTFT p50 | completions TTFT p50 "
             "| SSE events per request, chat / completions |", "|---|---|---|---|---|---|---|---|"]
    for (mix, c), by_route in sorted(results.items(), key=lambda kv: (kv[0][0], levels.index(kv[0][1]))):
        tps = {r: sum(s.output_tokens for s in v) / sum(s.wall_s for s in v) for r, v in by_route.items()}
        ttft = {r: sorted(s.ttft_p50 or 0 for s in v)[len(v) // 2] * 1000 for r, v in by_route.items()}
        events = {r: sum((s.events_per_request or 0) * s.requests for s in v) / sum(s.requests for s in v)
                  for r, v in by_route.items()}
        lines.append(f"| {mix} | {c} | {tps['chat']:.0f} | {tps['completions']:.0f} | "
                     f"{tps['completions'] / tps['chat']:.2f} | {ttft['chat']:.0f} ms | {ttft['completions']:.0f} ms "
                     f"| {events['chat']:.1f} / {events['completions']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=18123)
    opts = parser.parse_args(argv)
    from transformers import AutoTokenizer

    config = load_config()
    levels = [int(x) for x in opts.levels.split(",")]
    ours = config.ours
    tokenizer = AutoTokenizer.from_pretrained(model_dir(config.model))
    args = {"models": [{"id": ours.model_id, "source": config.model, "task": "chat",
                        "batching": ours.batching.model_dump(), "prefill_threads": ours.prefill_threads,
                        "decode_threads": ours.decode_threads, "limits": {"max_tokens": 4096}}]}
    cmd = [sys.executable, "-m", "bench.serve_ours", "--port", str(opts.port), "--args", json.dumps(args),
           "--num-cpus", str(ours.ray_num_cpus), "--env", json.dumps(ours.env)]
    base = f"http://127.0.0.1:{opts.port}"
    results: dict[tuple[str, int], dict[str, list[LevelStats]]] = {}
    log = Path(tempfile.mkdtemp(prefix="bench-completions-")) / "server.log"
    with managed_server(cmd, f"{base}/health", log, config.startup_timeout_s):
        drivers = {"chat": ChatDriver(base, ours.model_id),
                   "completions": CompletionsDriver(base, ours.model_id, tokenizer)}
        warm = make_prompts(2)
        for d in drivers.values():
            asyncio.run(d.warmup(warm, 8))
        for r in range(opts.rounds):
            for mix, spec in config.mixes.items():
                for c in levels:
                    prompts = make_prompts(config.requests_at(c), spec)
                    order = list(drivers) if (r + levels.index(c)) % 2 == 0 else list(reversed(drivers))
                    for route in order:
                        stats = asyncio.run(level(drivers[route], prompts, c, opts.max_tokens))
                        if stats.errors:
                            raise RuntimeError(f"{route} at {c} clients: {stats.first_error}")
                        results.setdefault((mix, c), {}).setdefault(route, []).append(stats)
                        print(f"round {r + 1} {mix} {c:>2} clients {route:<11} {stats.tokens_per_s:7.1f} tok/s",
                              flush=True)
    report = (f"# /v1/completions beside /v1/chat/completions\n\nModel `{config.model}`, batching of "
              f"contender (a), {opts.rounds} rounds pooled, max_tokens {opts.max_tokens}, greedy, ignore_eos.\n\n"
              + table(results, levels) + "\n")
    write_result("completions.md", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
