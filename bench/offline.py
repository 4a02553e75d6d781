"""Contender (e): the offline ceiling — the same requests through batched ``model.generate``, in-process.

At concurrency ``c`` the level's requests are taken ``c`` at a time, in order, and each group runs as one
left-padded greedy ``model.generate`` (static batching: no HTTP, no streaming, no scheduling). A stopping
criterion timestamps every decode step, so per request: TTFT = group start to first token, ITL = step gaps
(one token per step), end-to-end = group start to the step of the request's last token. Output tokens are
counted up to and including the first end token, as the server counts them.

All torch work runs on one thread of the driver's own, which ends at :meth:`OfflineDriver.close`, and the
model loads on a thread that ends with the load (see ``deployments.engines.base.on_passing_thread``: a
thread that ran torch's parallel ops and lives on slows every other one down).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from bench.load import LevelStats, RequestRecord, summarize
from deployments.engines.base import on_passing_thread


class _StepClock(StoppingCriteria):
    """Records the time of every generated step; never stops generation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _load(model_dir: Path | str, dtype: torch.dtype | None, device: torch.device) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


class OfflineDriver:
    def __init__(self, model_dir: Path | str, threads: int | None = 2, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = on_passing_thread(_load)(model_dir, dtype, self.device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offline")
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _texts(self, prompts: list[list[dict[str, str]]]) -> list[str]:
        return [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in prompts]

    def _group(self, texts: list[str], first_index: int, max_tokens: int) -> list[RequestRecord]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        clock = _StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                      stopping_criteria=StoppingCriteriaList([clock]))
        steps = [t - start for t in clock.times]
        records = []
        for row, new in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
            count = next((i + 1 for i, t in enumerate(new) if t in self.eos), len(new))
            times = steps[:count]
            records.append(RequestRecord(first_index + row, ttft=times[0] if times else None,
                                         chunk_times=times, e2e=times[-1] if times else None,
                                         output_tokens=count, tokens_from_usage=True))
        return records

    tokens_counted = "generate"

    def _measure(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                 deadline_s: float) -> tuple[list[RequestRecord], float]:
        texts = self._texts(prompts)
        records: list[RequestRecord] = []
        start = time.perf_counter()
        for first in range(0, len(texts), concurrency):
            if deadline_s and time.perf_counter() - start > deadline_s:
                break
            records += self._group(texts[first:first + concurrency], first, max_tokens)
        return records, time.perf_counter() - start

    async def warmup(self, prompts: list[list[dict[str, str]]], max_tokens: int) -> None:
        if prompts:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._measure, prompts, 1,
                                                             max_tokens, 0)

    async def measure(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                      deadline_s: float = 0) -> tuple[list[RequestRecord], float]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._measure, prompts,
                                                                concurrency, max_tokens, deadline_s)

    async def run_level(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                        deadline_s: float = 0) -> LevelStats:
        records, wall = await self.measure(prompts, concurrency, max_tokens, deadline_s)
        return summarize(records, concurrency, len(prompts), wall, tokens_counted=self.tokens_counted)
