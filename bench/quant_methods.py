"""Which CPU int8 weight-only quantization should ``quantization: int8`` mean, and is bf16 worth it?

Measures, on one real checkpoint (a float32 copy of SmolLM2-135M-Instruct, ``--model``), each way of
holding the weights that this torch can run:

- ``fp32-fast``: float32 through the engine's lean step (``fast_decode``, packed weights, product kernel:
  the product's default, what users get today);
- ``fp32`` / ``bf16``: float32 / bfloat16 weights through the transformers forward (``fast_decode=False``);
  ``bf16-fast``: bfloat16 through the lean step (which packs only float32, so plain ``F.linear``);
- ``ao-int8wo`` / ``ao-int8dyn``: torchao ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig``
  (through ``from_pretrained(quantization_config=TorchAoConfig(...))``, else a post-load ``quantize_``);
- ``torch-dynamic``: ``torch.ao.quantization.quantize_dynamic`` (qint8 ``nn.Linear``, fbgemm);
- ``quanto-int8``: optimum-quanto ``qint8`` weights (``QuantoConfig``, else ``quantize`` + ``freeze``);
- ``aten-int8pack``: no library: each projection swapped for :class:`Int8PackLinear` (int8 per-channel
  weights through ATen's ``torch._weight_int8pack_mm``).

The tied ``lm_head`` stays in the load dtype everywhere (transformers' default for both configs), so
every int8 method quantizes the same 210 projections of the 30 decoder layers.

For each method: (a) whether greedy decoding answers "What is the capital of France?" with Paris, and how
many of the first 32 greedy tokens agree with float32's on 5 chat prompts (common prefix, summed);
(b) the median decode-step time (forward + argmax) with a KV cache at 1, 8 and 32 rows, at torch threads
1 and 2; (c) a ~500-token prompt's prefill; (d) the bytes the weights hold (parameters and buffers,
tensor subclasses and packed params unpacked to their storages, shared storage counted once, plus the
lean step's packed copies for the ``-fast`` rows).

All of it goes through the engine's own batch code (:class:`deployments.engines.batch.Batch`: its
``prefill`` and ``decode``, with the :class:`FastDecoder` for the ``-fast`` rows), driven directly on
this thread rather than through the engine's model thread and streams, so a step is timed alone.
Every model is loaded once; repeats are interleaved (each round measures every method once per cell,
A B A B), medians over rounds are reported with their spread (max - min, % of median), and each
round's load average is recorded to show a disturbed host.

Run: ``PYTHONPATH=/tmp/team/qpkgs python -m bench.quant_methods`` (torchao / optimum-quanto importable);
writes ``bench/results/quant_methods.md``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.engines.batch import Batch
from deployments.engines.fast_decode import fast_decoder

PROMPTS = ["What is the capital of France?",
           "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue.",
           "List three prime numbers greater than 10.",
           "How do I reverse a list in Python?"]
LONG_TOPIC = ("Summarise the following notes. " + "The engine admits requests, prefills them together, "
              "and decodes one token per running row at each step, publishing text as it goes. ") * 40
ROWS = (1, 8, 32)
THREADS = (1, 2)
COMPARE_TOKENS = 32


@dataclass
class Loaded:
    name: str
    model: Any
    fast: Any = None
    via: str = ""
    error: str = ""
    load_s: float = 0.0
    rss_delta: int = 0
    times: dict[tuple, list[float]] = field(default_factory=dict)


def _pretrained(path: str, dtype: torch.dtype, config: Any = None) -> Any:
    kwargs = {"quantization_config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


def _not_head(module: Any, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


def _torchao(config_name: str) -> Callable[[str], tuple[Any, str]]:
    def load(path: str) -> tuple[Any, str]:
        import torchao.quantization as ao
        from transformers import TorchAoConfig
        config = getattr(ao, config_name)()
        try:
            return _pretrained(path, torch.float32, TorchAoConfig(config)), "from_pretrained(TorchAoConfig)"
        except Exception as exc:  # noqa: BLE001 - the fallback is part of what is measured
            note = f"from_pretrained failed ({type(exc).__name__}: {str(exc)[:80]}); "
        model = _pretrained(path, torch.float32)
        ao.quantize_(model, config, filter_fn=_not_head)
        return model, note + "quantize_ after load"
    return load


def _torch_dynamic(path: str) -> tuple[Any, str]:
    model = _pretrained(path, torch.float32)
    head = model.lm_head
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.lm_head = head  # keep the tied head as it is (as the other methods do)
    return model, "quantize_dynamic after load"


def _quanto(path: str) -> tuple[Any, str]:
    from transformers import QuantoConfig
    try:
        return _pretrained(path, torch.float32, QuantoConfig(weights="int8")), "from_pretrained(QuantoConfig)"
    except Exception as exc:  # noqa: BLE001
        note = f"from_pretrained failed ({type(exc).__name__}: {str(exc)[:80]}); "
    from optimum.quanto import freeze, qint8, quantize
    model = _pretrained(path, torch.float32)
    quantize(model, weights=qint8, exclude="lm_head")
    freeze(model)
    return model, note + "quantize+freeze after load"


class Int8PackLinear(torch.nn.Module):
    """``nn.Linear`` with int8 weights, symmetric per output channel, multiplied by ATen's CPU kernel
    ``torch._weight_int8pack_mm`` (float32 activations, int8 weights widened in registers): the kernel
    torchao's and quanto's CPU paths do not reach with float32 activations."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _aten_int8pack(path: str) -> tuple[Any, str]:
    model = _pretrained(path, torch.float32)
    for name, module in list(model.named_modules()):
        if _not_head(module, name):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8PackLinear(module))
    return model, "module swap after load (no library)"


# name -> (loader, whether the engine's lean step runs it)
METHODS: dict[str, tuple[Callable[[str], tuple[Any, str]], bool]] = {
    "fp32-fast": (lambda p: (_pretrained(p, torch.float32), "from_pretrained"), True),
    "fp32": (lambda p: (_pretrained(p, torch.float32), "from_pretrained"), False),
    "bf16": (lambda p: (_pretrained(p, torch.bfloat16), "from_pretrained"), False),
    "bf16-fast": (lambda p: (_pretrained(p, torch.bfloat16), "from_pretrained"), True),
    "ao-int8wo": (_torchao("Int8WeightOnlyConfig"), False),
    "ao-int8dyn": (_torchao("Int8DynamicActivationInt8WeightConfig"), False),
    "torch-dynamic": (_torch_dynamic, False),
    "quanto-int8": (_quanto, False),
    "aten-int8pack": (_aten_int8pack, False),
}


def _storages(t: torch.Tensor, seen: dict[int, int]) -> None:
    """Record ``t``'s storages (a tensor subclass's inner tensors, recursively)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            _storages(getattr(t, name), seen)
        return
    if t.is_quantized:
        seen[id(t)] = t.numel() * t.element_size() + 8 * t.q_per_channel_scales().numel() \
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else t.numel() * t.element_size()
        return
    storage = t.untyped_storage()
    seen[storage.data_ptr()] = storage.nbytes()


def weight_bytes(model: Any) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        _storages(t, seen)
    for module in model.modules():  # quantize_dynamic: weights live in packed params, not parameters
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            _storages(weight, seen)
            if bias is not None:
                _storages(bias, seen)
    return sum(seen.values())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(name: str, path: str) -> Loaded:
    loader, lean = METHODS[name]
    gc.collect()
    before, start = _rss(), time.perf_counter()
    try:
        model, via = loader(path)
    except Exception as exc:  # noqa: BLE001 - a method that does not load is a result
        return Loaded(name, None, error=f"{type(exc).__name__}: {str(exc)[:160]}")
    entry = Loaded(name, model, via=via, load_s=time.perf_counter() - start)
    if lean:
        entry.fast = fast_decoder(model, True, True)
        entry.via += "; lean step" if entry.fast is not None else "; lean step REFUSED"
    gc.collect()
    entry.rss_delta = _rss() - before
    return entry


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@torch.inference_mode()
def greedy(entry: Loaded, prompts: list[list[int]], steps: int, pad: int) -> list[list[int]]:
    """``steps`` greedy tokens for each prompt, the prompts decoded together as one engine batch."""
    batch, logits = Batch.prefill(entry.model, list(range(len(prompts))), prompts, pad, torch.device("cpu"),
                                  entry.fast)
    out = [logits.argmax(-1).tolist()]
    for _ in range(steps - 1):
        batch.set_next(out[-1])
        out.append(batch.decode(entry.model, entry.fast).argmax(-1).tolist())
    return [list(column) for column in zip(*out)]


@torch.inference_mode()
def decode_steps(entry: Loaded, batch: Batch, steps: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one decode step (forward + argmax) over ``steps`` steps
    after 2 warm ones. At one thread CPU time is what a step costs regardless of neighbours' load."""
    times, cpu = [], []
    for i in range(steps + 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        tokens = batch.decode(entry.model, entry.fast).argmax(-1).tolist()
        batch.set_next(tokens)
        if i >= 2:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), statistics.median(cpu)


@torch.inference_mode()
def prefill_time(entry: Loaded, prompt: list[int], pad: int) -> float:
    start = time.perf_counter()
    Batch.prefill(entry.model, [0], [prompt], pad, torch.device("cpu"), entry.fast)
    return time.perf_counter() - start


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med * 100 if med else 0
    return f"{med * 1e3:.1f} ±{spread:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/team/smollm2-f32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per cell and round")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--out", default="bench/results/quant_methods.md")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    long_prompt = chat_ids(tokenizer, LONG_TOPIC)[-500:]

    entries = []
    for name in args.methods.split(","):
        entry = load(name, args.model)
        entries.append(entry)
        print(f"{name}: {entry.via or entry.error} ({entry.load_s:.1f}s)", flush=True)
    live = [e for e in entries if e.model is not None]

    # (a) accuracy, against float32 through the transformers forward.
    reference = next((e for e in live if e.name == "fp32"), None) or next(e for e in live if e.name == "fp32-fast")
    ref_tokens = greedy(reference, prompts, COMPARE_TOKENS, pad)
    accuracy: dict[str, tuple[str, int, str]] = {}
    for entry in live:
        try:
            outs = greedy(entry, prompts, COMPARE_TOKENS, pad)
        except Exception as exc:  # noqa: BLE001
            entry.error = f"generate: {type(exc).__name__}: {str(exc)[:160]}"
            continue
        agree = 0
        for mine, ref in zip(outs, ref_tokens):
            agree += next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), len(ref))
        answer = tokenizer.decode(outs[0], skip_special_tokens=True)
        accuracy[entry.name] = ("Paris" in answer, agree, answer.strip().replace("\n", " ")[:60])
        print(entry.name, accuracy[entry.name], flush=True)
    live = [e for e in live if not e.error]

    # (b) decode steps: one running batch per method and row count, stepped on in every round.
    batches = {}
    for entry in live:
        for rows in rows_list:
            row_prompts = [prompts[i % len(prompts)] + [pad] * (i // len(prompts)) for i in range(rows)]
            with torch.inference_mode():
                batch, logits = Batch.prefill(entry.model, list(range(rows)), row_prompts, pad,
                                              torch.device("cpu"), entry.fast)
            batch.set_next(logits.argmax(-1).tolist())
            batches[entry.name, rows] = batch
    loads = []
    for round_ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for threads in THREADS:
            torch.set_num_threads(threads)
            for rows in rows_list:
                order = live if round_ % 2 == 0 else live[::-1]  # A B .. B A: no method always first
                for entry in order:
                    wall, cpu = decode_steps(entry, batches[entry.name, rows], args.steps)
                    entry.times.setdefault(("decode", threads, rows), []).append(wall)
                    entry.times.setdefault(("cpu", threads, rows), []).append(cpu)
            for entry in order:
                entry.times.setdefault(("prefill", threads), []).append(prefill_time(entry, long_prompt, pad))
            print(f"round {round_ + 1} threads {threads} done", flush=True)
        write(args, entries, accuracy, rows_list, loads + [os.getloadavg()[0]], len(long_prompt))  # partial
        print(f"round {round_ + 1} done, load {os.getloadavg()[0]:.2f}", flush=True)
    loads.append(os.getloadavg()[0])
    torch.set_num_threads(2)
    write(args, entries, accuracy, rows_list, loads, len(long_prompt))


def write(args: Any, entries: list[Loaded], accuracy: dict, rows_list: list[int], loads: list[float],
          long_len: int) -> None:
    fp32 = next((e for e in entries if e.name == "fp32" and e.model is not None), None)
    head = ["method", "loads via", "Paris", f"agree /{COMPARE_TOKENS * len(PROMPTS)}", "weight MB", "RSS Δ MB"]
    head += [f"step ms t{t} r{r}" for t in THREADS for r in rows_list]
    head += [f"prefill {long_len} ms t{t}" for t in THREADS]
    head += [f"step CPU ms t1 r{r}" for r in rows_list]
    lines = [f"# CPU weight formats on SmolLM2-135M-Instruct ({os.cpu_count()} CPUs, torch {torch.__version__})",
             "", f"Medians of {args.rounds} interleaved rounds (±: max-min spread, % of median); decode = "
             f"median of {args.steps} steps per round, forward + argmax. Load average per round: "
             + ", ".join(f"{x:.2f}" for x in loads) + ". Written by `python -m bench.quant_methods`.", "",
             "Step CPU = the process's CPU seconds per step at 1 thread (robust to a busy host).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        if e.model is None or e.error:
            lines.append(f"| {e.name} | FAILED: {e.error or e.via} |" + " |" * (len(head) - 2))
            continue
        paris, agree, answer = accuracy.get(e.name, (False, 0, ""))
        cells = [e.name, e.via, "yes" if paris else f"no ({answer})", str(agree),
                 f"{(weight_bytes(e.model) + getattr(e.fast, 'packed_bytes', 0)) / 2**20:.0f}", f"{e.rss_delta / 2**20:.0f}"]
        cells += [_cell(e.times.get(("decode", t, r))) for t in THREADS for r in rows_list]
        cells += [_cell(e.times.get(("prefill", t))) for t in THREADS]
        cells += [_cell(e.times.get(("cpu", 1, r))) for r in rows_list]
        lines.append("| " + " | ".join(cells) + " |")
    if fp32 is not None and ("decode", THREADS[-1], rows_list[-1]) in fp32.times:
        lines += ["", "Relative to fp32 (transformers forward), median step time (lower is faster):", ""]
        lines.append("| method | " + " | ".join(f"t{t} r{r}" for t in THREADS for r in rows_list) + " |")
        lines.append("|---|" + "---|" * (len(THREADS) * len(rows_list)))
        for e in entries:
            if ("decode", THREADS[-1], rows_list[-1]) in e.times and fp32.times:
                lines.append(f"| {e.name} | " + " | ".join(
                    f"{statistics.median(e.times[('decode', t, r)]) / statistics.median(fp32.times[('decode', t, r)]):.2f}"
                    for t in THREADS for r in rows_list) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
