"""The generation engine: continuous batching over one model, no Ray, no HTTP.

Contract: ``generate(requests)`` admits a group of requests and is an async iterator that, after every
engine step touching the group, yields one entry per request: the list of :class:`Delta` produced for it
since the last yield (possibly empty), a :class:`ServingError` if that request failed (alone), or None
once the request has finished. A choice's last delta carries ``finish_reason`` and its token counts.

Groups admitted while others are decoding are prefilled and concatenated into the running batch at the
next step boundary (up to ``max_running_rows``), so a new request does not wait for a long one. All model
work runs on one dedicated thread; the event loop only schedules and hands out deltas.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from app.errors import InternalError, ServingError
from deployments.batch import Batch, supports_concatenation
from deployments.detokenize import TextStream
from deployments.generation import Delta, GenerationRequest, SamplingParams
from deployments.sampling import make_generator, select_tokens

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """One choice being generated."""

    request: GenerationRequest
    index: int
    stream: TextStream
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    pending: list[Delta] = field(default_factory=list)
    finished: bool = False
    error: ServingError | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass(eq=False)
class _Group:
    requests: list[GenerationRequest]
    seqs: list[_Sequence]
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reported: set[int] = field(default_factory=set)  # requests whose end was yielded already

    def outputs(self) -> list[list[Delta] | ServingError | None]:
        """Per request: new deltas, its error, or None once its end was reported."""
        out: list[list[Delta] | ServingError | None] = []
        for i, request in enumerate(self.requests):
            seqs = [s for s in self.seqs if s.request is request]
            error = next((s.error for s in seqs if s.error is not None), None)
            if i in self.reported:
                out.append(None)
            elif error is not None or request.cancelled:
                self.reported.add(i)
                out.append(error)
            else:
                deltas = [d for s in seqs for d in s.pending]
                if all(s.finished for s in seqs):
                    self.reported.add(i)
                out.append(deltas)
            for s in seqs:
                s.pending = []
        return out

    @property
    def done(self) -> bool:
        return len(self.reported) == len(self.requests)


class GenerationEngine:
    """Owns one model and tokenizer; see the module docstring for the contract."""

    def __init__(self, model: Any, tokenizer: Any, *, device: torch.device, eos_token_ids: set[int],
                 pad_token_id: int, max_running_rows: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.eos_token_ids = set(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_running_rows = max_running_rows
        self.can_concatenate = supports_concatenation(model)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._waiting: deque[_Group] = deque()
        self._groups: list[_Group] = []
        self._running: Batch | None = None
        self._loop_task: asyncio.Task | None = None
        # Counters for metrics and tests (e.g. that a cancelled request stopped consuming steps).
        self.steps = 0
        self.tokens_generated = 0

    @property
    def running_rows(self) -> int:
        return len(self._running) if self._running is not None else 0

    async def generate(self, requests: list[GenerationRequest]
                       ) -> AsyncIterator[list[list[Delta] | ServingError | None]]:
        seqs = [_Sequence(r, i, TextStream(self.tokenizer, r.params.stop, r.prompt_ids),
                          None if r.params.greedy else make_generator(r.params.seed, i))
                for r in requests for i in range(r.n)]
        group = _Group(requests, seqs)
        self._waiting.append(group)
        self._groups.append(group)
        self._ensure_loop()
        try:
            while not group.done:
                await group.ready.wait()
                group.ready.clear()
                yield group.outputs()
        finally:
            # Whoever stops listening (the caller went away, or the batch ended) frees the rows.
            for request in requests:
                request.cancelled = True

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting or self._running is not None:
            admitted = self._admissible()
            try:
                if admitted:
                    await loop.run_in_executor(self._executor, self._prefill, admitted)
                if self._running is not None:
                    await loop.run_in_executor(self._executor, self._decode)
            except Exception:  # a bug or a device failure: fail what is in flight, keep serving
                logger.exception("engine step failed")
                for seq in [*(self._running.rows if self._running else []),
                            *(s for g in admitted for s in g.seqs)]:
                    seq.error = seq.error or InternalError("generation failed")
                self._running = None
            self._notify()
        self._notify()

    def _admissible(self) -> list[_Group]:
        """Waiting groups that fit next to the running batch, in arrival order."""
        admitted: list[_Group] = []
        if self._running is not None and not self.can_concatenate:
            return admitted
        rows = self.running_rows
        while self._waiting:
            group = self._waiting[0]
            live = sum(not s.request.cancelled for s in group.seqs)
            if rows > 0 and rows + live > self.max_running_rows:
                break
            self._waiting.popleft()
            rows += live
            admitted.append(group)
        return admitted

    def _notify(self) -> None:
        """Wake the admitted groups (waiting ones have nothing new) and forget finished ones."""
        waiting = set(map(id, self._waiting))
        for group in self._groups:
            if id(group) not in waiting:
                group.ready.set()
        self._groups = [g for g in self._groups if not g.done]

    # --- model thread ---------------------------------------------------------------------------

    def _prefill(self, groups: list[_Group]) -> None:
        seqs = [s for g in groups for s in g.seqs if not s.request.cancelled]
        if not seqs:
            return
        with torch.inference_mode():
            batch, logits = Batch.prefill(self.model, seqs, [s.request.prompt_ids for s in seqs],
                                          self.pad_token_id, self.device)
            self._advance(batch, logits)
            if batch is not None and (batch := self._keep_live(batch)) is not None:
                self._running = batch if self._running is None else self._running.concatenate(batch)

    def _decode(self) -> None:
        batch = self._keep_live(self._running)
        if batch is None:
            self._running = None
            return
        with torch.inference_mode():
            logits = batch.decode(self.model)
            self._advance(batch, logits)
            self._running = self._keep_live(batch)

    def _advance(self, batch: Batch, logits: torch.Tensor) -> None:
        """Choose each row's next token and turn it into output."""
        self.steps += 1
        tokens, failed = select_tokens(logits, batch.rows)
        batch.set_next(tokens)
        self.tokens_generated += len(tokens)
        for i, (seq, token) in enumerate(zip(batch.rows, tokens)):
            if i in failed:
                logger.error("request %s: sampling failed: %r", seq.request.request_id, failed[i])
                seq.error = InternalError("sampling failed for this request's settings")
                continue
            try:
                self._append(seq, token)
            except Exception:  # isolate: this sequence fails, its neighbours carry on
                logger.exception("request %s failed while decoding", seq.request.request_id)
                seq.error = InternalError("generation failed for this request")

    def _append(self, seq: _Sequence, token: int) -> None:
        seq.output_ids.append(token)
        finish = None
        if token in self.eos_token_ids:
            text, finish = seq.stream.finish(), "stop"
        else:
            text = seq.stream.push(token)
            if seq.stream.stopped:
                finish = "stop"
            elif len(seq.output_ids) >= seq.params.max_new_tokens:
                text, finish = text + seq.stream.finish(), "length"
        if finish is None:
            if text:
                seq.pending.append(Delta(seq.index, text, [token]))
            return
        seq.finished = True
        seq.pending.append(Delta(seq.index, text, [token], finish, len(seq.request.prompt_ids),
                                 len(seq.output_ids)))

    @staticmethod
    def _keep_live(batch: Batch) -> Batch | None:
        keep = [i for i, s in enumerate(batch.rows)
                if not (s.finished or s.error is not None or s.request.cancelled)]
        return batch.filter(keep)
