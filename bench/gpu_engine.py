"""The engine on a real-size model, Ray-free: ours vs HF ``generate`` vs transformers' continuous batching.

    python -m bench.gpu_engine                          # Qwen2.5-0.5B-shaped, bf16, on CUDA when present
    python -m bench.gpu_engine --shape tiny --device cpu --levels 1,4 --max-tokens 16   # a CPU smoke run

Imports torch, transformers and this project's Ray-free modules only, so it runs on a GPU machine where
Ray is not installed. The checkpoint is a random-init model of the chosen shape (weights never leave the
machine; nothing is downloaded) with the demo tokenizer, written to a temporary directory and loaded the
way the server loads any checkpoint. At each level (``clients`` concurrent sequences, greedy,
``--max-tokens`` each, the short chat mix), three contenders:

- **engine**: our :class:`GenerationEngine` with in-process streaming clients (bench/engine_direct.py);
- **generate**: HF ``model.generate`` on static batches of ``clients`` prompts (bench/offline.py);
- **generate_batch**: transformers' continuous batching, ``max_requests_per_batch = clients``, all
  requests submitted at once (TTFT from its per-token timestamps).

Prints a Markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.config import DEFAULT_MIXES
from bench.prompts import make_prompts

# name -> Qwen2Config fields. qwen2.5-0.5b: the published Qwen2.5-0.5B architecture (494M parameters).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1_000_000.0),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, vocab_size=4096, tie_word_embeddings=True),
}


def build_checkpoint(shape: str, dtype: torch.dtype, out: Path) -> Path:
    """A random-init Qwen2 model of ``shape`` with the demo tokenizer (ids beyond its vocabulary decode
    to nothing, so the model keeps its real-size embedding and head)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from deployments.models.demo import SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer(2048)
    eos = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)[2]
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, dtype=str(dtype).split(".")[-1])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_engine(path: Path, device: str, dtype: str, prompts, levels, max_tokens) -> dict[int, tuple]:
    from bench.engine_direct import EngineDriver

    driver = EngineDriver(path, threads=None, prefill_threads=None, device=device, dtype=dtype,
                          batching={"max_batch_size": 64, "batch_wait_timeout_s": 0.0,
                                    "max_running_rows": max(levels)})
    out = {}
    try:
        asyncio.run(driver.warmup(prompts[:2], max_tokens))
        for c in levels:
            stats = asyncio.run(driver.run_level(prompts[:2 * c], c, max_tokens))
            out[c] = (stats.tokens_per_s, stats.ttft_p50, stats.errors)
    finally:
        driver.close()
    return out


def run_generate(path: Path, device: str, dtype: torch.dtype, prompts, levels, max_tokens) -> dict[int, tuple]:
    from bench.offline import OfflineDriver

    driver = OfflineDriver(path, threads=None, device=device, dtype=dtype)
    asyncio.run(driver.warmup(prompts[:1], max_tokens))
    out = {}
    for c in levels:
        stats = asyncio.run(driver.run_level(prompts[:2 * c], c, max_tokens))
        out[c] = (stats.tokens_per_s, stats.ttft_p50, stats.errors)
    del driver
    return out


def run_generate_batch(path: Path, device: str, dtype: torch.dtype, prompts, levels, max_tokens
                       ) -> dict[int, tuple]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for m in prompts]
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=model.config.eos_token_id,
                              pad_token_id=model.config.pad_token_id)
    out = {}
    for c in levels:
        cb = ContinuousBatchingConfig(max_requests_per_batch=c)
        _sync(device)
        start = time.perf_counter()
        results = model.generate_batch(ids[:2 * c], generation_config=config, continuous_batching_config=cb,
                                       record_timestamps=True)
        _sync(device)
        wall = time.perf_counter() - start
        tokens = sum(len(r.generated_tokens) for r in results.values())
        ttfts = [r.timestamps[0] - r.created_time for r in results.values() if r.timestamps]
        errors = sum(r.error is not None for r in results.values())
        out[c] = (tokens / wall, statistics.median(ttfts) if ttfts else None, errors)
    return out


def _cell(figures: tuple | None) -> str:
    if figures is None:
        return "–"
    tps, ttft, errors = figures
    return f"{tps:,.0f} ({'–' if ttft is None else f'{ttft * 1e3:,.0f} ms'})" + (f", {errors} errors" if errors else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--levels", default="1,8,32,64", help="concurrent sequences")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--contenders", default="engine,generate,generate_batch")
    p.add_argument("--out", default=str(Path(__file__).with_name("results") / "gpu.md"))
    opts = p.parse_args(argv)
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, opts.dtype)
    levels = [int(x) for x in opts.levels.split(",")]
    prompts = make_prompts(2 * max(levels), DEFAULT_MIXES["short"])
    runners = {"engine": lambda path: run_engine(path, device, opts.dtype, prompts, levels, opts.max_tokens),
               "generate": lambda path: run_generate(path, device, dtype, prompts, levels, opts.max_tokens),
               "generate_batch": lambda path: run_generate_batch(path, device, dtype, prompts, levels,
                                                                 opts.max_tokens)}
    rows: dict[str, dict[int, tuple] | str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        path = build_checkpoint(opts.shape, dtype, Path(tmp))
        for name in opts.contenders.split(","):
            try:
                rows[name] = runners[name](path)
            except Exception as exc:  # noqa: BLE001 - reported in the table, never silently dropped
                rows[name] = f"{type(exc).__name__}: {exc}"[:300]
            print(name, rows[name], flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    command = " ".join(["python -m bench.gpu_engine", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"`{command}`", "", f"Device: {device} ({gpu}); shape {opts.shape}, {opts.dtype}, random init; greedy, "
             f"max_tokens {opts.max_tokens}, short chat prompts, 2 × clients requests per level; torch "
             f"{torch.__version__}.", "",
             "| out tok/s (TTFT p50) | " + " | ".join(f"{c} sequences" for c in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for name, figures in rows.items():
        cells = [figures] * len(levels) if isinstance(figures, str) else [_cell(figures.get(c)) for c in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
