"""Contender "engine alone": our :class:`GenerationEngine` driven in-process, no Ray, no HTTP.

The same checkpoint and prompts as the servers: each client renders its prompt with the deployment's own
translation (``to_generation_request``), submits it to the engine and reads the request's stream, so
TTFT = submit to first non-empty text, and tokens are counted from the finish delta (as ``usage``).
This is the ceiling of the serving path: what the engine does with the whole machine to itself.

Only torch, transformers and this project's Ray-free modules are imported here (``bench/gpu_engine.py``
reuses it on machines without Ray).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import torch

from app.config import ChatModelSpec
from app.protocol.chat import ChatCompletionRequest
from bench.load import LevelStats, RequestRecord, summarize
from deployments.engines.chat_params import to_generation_request


class EngineDriver:
    """Owns one engine; ``run_level`` runs ``concurrency`` closed-loop in-process clients over it."""

    tokens_counted = None

    def __init__(self, model_dir: Path | str, *, threads: int | None = 2, prefill_threads: int | None = 2,
                 batching: dict[str, Any] | None = None, device: str = "auto", dtype: str = "auto",
                 max_tokens: int = 4096, spec_extra: dict[str, Any] | None = None) -> None:
        """``spec_extra``: further ChatModelSpec fields (e.g. {"quantization": "int8", "device": "cpu"}),
        as bench.contenders gives the server contender of the same name."""
        from deployments.models.loader import load_chat_engine

        if threads:
            torch.set_num_threads(threads)
        self.spec = ChatModelSpec(**{
            "id": "engine", "source": str(model_dir), "device": device, "dtype": dtype,
            "prefill_threads": prefill_threads, "decode_threads": threads,
            "batching": batching or {"max_batch_size": 8, "batch_wait_timeout_s": 0.0, "max_running_rows": 64},
            "limits": {"default_max_tokens": 64, "max_tokens": max_tokens}, **(spec_extra or {})})
        self.engine = load_chat_engine(self.spec)

    def close(self) -> None:
        self.engine.close()

    async def one(self, index: int, messages: list[dict[str, str]], max_tokens: int) -> RequestRecord:
        record = RequestRecord(index)
        start = time.perf_counter()
        try:
            body = ChatCompletionRequest(model="engine", messages=messages, max_tokens=max_tokens,
                                         temperature=0)
            request = to_generation_request(body, self.engine, self.spec.limits)
            (stream,) = self.engine.submit([request])
            async for deltas in stream:
                now = time.perf_counter() - start
                if any(d.text for d in deltas):
                    record.chunk_times.append(now)
                    if record.ttft is None:
                        record.ttft = now
                for d in deltas:
                    if d.finish_reason is not None:
                        record.output_tokens = d.completion_tokens
                        record.tokens_from_usage = True
            record.e2e = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - a failed request is a measured outcome
            record.error = f"{type(exc).__name__}: {exc}"[:400]
        return record

    async def measure(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                      deadline_s: float = 0) -> tuple[list[RequestRecord], float]:
        queue = list(enumerate(prompts))
        queue.reverse()
        records: list[RequestRecord] = []
        start = time.perf_counter()

        async def worker() -> None:
            while queue:
                if deadline_s and time.perf_counter() - start > deadline_s:
                    return
                index, messages = queue.pop()
                records.append(await self.one(index, messages, max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - start

    async def warmup(self, prompts: list[list[dict[str, str]]], max_tokens: int) -> None:
        if prompts:
            records, _ = await self.measure(prompts, 1, max_tokens)
            failed = [r.error for r in records if r.error]
            if failed:
                raise RuntimeError(f"warmup failed: {failed[0]}")

    async def run_level(self, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                        deadline_s: float = 0) -> LevelStats:
        records, wall = await self.measure(prompts, concurrency, max_tokens, deadline_s)
        return summarize(records, concurrency, len(prompts), wall)
