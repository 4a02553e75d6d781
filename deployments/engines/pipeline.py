"""The pipeline engine: transformers pipeline tasks (fill-mask, ...) over any checkpoint of the task,
every text of every waiting request in one padded forward pass.

Contracts:

- :meth:`PipelineEngine.prepare` (CPU, synchronous, any thread; tokenizing is serialised on the engine's
  own tokenizer copy) turns one wire request into a :class:`PipelineJob`: its texts tokenized, each
  checked (length; the task's own check, e.g. a mask token), and the task's settings resolved. It raises
  the :class:`~app.errors.InvalidRequest` that refuses this request alone.
- :meth:`PipelineEngine.submit` (the :class:`~deployments.engines.base.Engine` contract, from
  :class:`~deployments.engines.jobs.JobEngine`) queues jobs;
  the engine's one model thread takes everything waiting when it is free and runs
  :meth:`PipelineEngine.forward` on it: all texts padded (right) into one batch and one forward pass
  (split only past ``max_batch_tokens``, longest texts first), then each text's answer from its own row.
  Each job's stream yields one list: a :class:`PipelineResult` per text, in order.
- A text's answer does not depend on its batch neighbours beyond float rounding: right padding keeps its
  positions, and the attention mask hides the padding.

What a task adds (model class, settings, checks, forward, postprocessing) is its :class:`Head`
(``deployments/engines/pipeline_heads.py``).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from app.config import BatchingSpec
from app.errors import ContextLengthExceeded
from deployments.engines.jobs import JobEngine
from deployments.engines.pipeline_heads import Head, input_at, narrow_logits_supported
from deployments.engines.pipeline_records import PipelineResult

logger = logging.getLogger(__name__)


@dataclass
class TextRow:
    """One tokenized text of a job."""

    index: int  # position in the request's inputs
    ids: list[int]
    extra: dict[str, list[int]]  # other model inputs the tokenizer made (token_type_ids)


@dataclass
class PipelineJob:
    """One request, ready to batch."""

    rows: list[TextRow]
    settings: Any  # the head's settings
    cancelled: bool = False


class PipelineEngine(JobEngine):
    """A loaded pipeline model and its task head. ``forward`` runs on the model thread only."""

    def __init__(self, model, tokenizer, head: Head, *, device: torch.device, max_input_tokens: int,
                 max_batch_tokens: int = 16384) -> None:
        super().__init__("pipeline")
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.device = device
        self.max_input_tokens = max_input_tokens
        self.max_batch_tokens = max_batch_tokens
        # prepare() tokenizes on worker threads, forward() decodes on the model thread: a fast tokenizer
        # must not be called from two threads at once (a call may change its truncation state), so
        # preprocessing has a copy of its own, used under a lock.
        self.prep_tokenizer = copy.deepcopy(tokenizer)
        self._prep_lock = threading.Lock()
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.vocab_size = int(model.config.vocab_size)
        self.mask_token, self.mask_token_id = tokenizer.mask_token, tokenizer.mask_token_id
        self.pad_token_id: int | None = tokenizer.pad_token_id  # None: padding uses id 0 (masked out anyway)
        if head.uses_mask_token and self.mask_token_id is None:
            raise ValueError(f"the tokenizer of {model.name_or_path!r} has no mask token")
        self.narrow_logits = head.uses_mask_token and narrow_logits_supported(model, self.mask_token_id, device)
        self.forwards = 0  # forward passes
        self.texts = 0  # texts answered
        self.batch_tokens = 0  # padded tokens of all passes

    # -- per request (worker thread) ----------------------------------------------------------------

    def prepare(self, texts: list[str], params: Any) -> PipelineJob:
        """Tokenize and check ``texts`` and resolve ``params`` (the wire request's parameters) into a job."""
        single = len(texts) == 1
        with self._prep_lock:
            settings = self.head.settings(params, self)
            encoded = self.prep_tokenizer(texts, return_attention_mask=False)
        rows = []
        for i, ids in enumerate(encoded["input_ids"]):
            index = None if single else i
            if len(ids) > self.max_input_tokens:
                where, param = input_at(index)
                raise ContextLengthExceeded(
                    f"This model's maximum input length is {self.max_input_tokens} tokens, but the input"
                    f"{where} has {len(ids)} tokens; shorten it.", param=param)
            self.head.check(ids, index, self)
            extra = {k: v[i] for k, v in encoded.items() if k != "input_ids"}
            rows.append(TextRow(index=i, ids=ids, extra=extra))
        return PipelineJob(rows=rows, settings=settings)

    # -- the Engine contract (event loop) -----------------------------------------------------------

    def apply(self, batching: BatchingSpec) -> None:
        """Adopt ``max_batch_tokens`` (admission itself is the deployment's @serve.batch)."""
        self.max_batch_tokens = getattr(batching, "max_batch_tokens", self.max_batch_tokens)

    def stats(self) -> dict[str, Any]:
        return {"forwards": self.forwards, "texts": self.texts, "batch_tokens": self.batch_tokens,
                "waiting": len(self._waiting), "context_len": self.max_input_tokens}  # /v1/models' max_model_len

    # -- per batch (model thread) -------------------------------------------------------------------

    @torch.inference_mode()
    def _compute(self, jobs: list[PipelineJob]) -> list[list[PipelineResult]]:
        return self.forward(jobs)

    def forward(self, jobs: list[PipelineJob]) -> list[list[PipelineResult]]:
        """The answers of ``jobs``: every text in one padded pass (more only past max_batch_tokens)."""
        rows = [(j, row) for j, job in enumerate(jobs) for row in job.rows]
        outputs: dict[int, Any] = {}
        for group in self._passes(rows):
            batch_rows = [row for _, _, row in group]
            batch = self._pad(batch_rows)
            self.forwards += 1
            self.batch_tokens += batch["input_ids"].numel()
            for (k, _, _), out in zip(group, self.head.run(self, batch, batch_rows)):
                outputs[k] = out
        results: list[list[PipelineResult]] = [[] for _ in jobs]
        for k, (j, row) in enumerate(rows):
            value = self.head.postprocess(self, row, outputs[k], jobs[j].settings)
            results[j].append(PipelineResult(index=row.index, value=value))
        self.texts += len(rows)
        return results

    def _passes(self, rows: list[tuple[int, TextRow]]) -> list[list[tuple[int, int, TextRow]]]:
        """``rows`` (numbered) in one pass, or, past max_batch_tokens, in passes of at most that many
        padded tokens, longest first (a text longer than the bound has a pass of its own)."""
        numbered = [(k, j, row) for k, (j, row) in enumerate(rows)]
        if not numbered or len(numbered) * max(len(r.ids) for _, _, r in numbered) <= self.max_batch_tokens:
            return [numbered] if numbered else []
        groups: list[list[tuple[int, int, TextRow]]] = []
        for item in sorted(numbered, key=lambda x: -len(x[2].ids)):
            if groups and (len(groups[-1]) + 1) * len(groups[-1][0][2].ids) <= self.max_batch_tokens:
                groups[-1].append(item)
            else:
                groups.append([item])
        return groups

    def _pad(self, rows: list[TextRow]) -> dict[str, torch.Tensor]:
        """Right-padded tensors of ``rows`` on the model's device: input_ids (pad token), attention_mask,
        and the tokenizer's other inputs (token_type_ids; 0 in the padding)."""
        width = max(len(row.ids) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        extra = {k: torch.zeros((len(rows), width), dtype=torch.long) for k in rows[0].extra}
        for i, row in enumerate(rows):
            n = len(row.ids)
            ids[i, :n] = torch.tensor(row.ids)
            mask[i, :n] = 1
            for k, values in row.extra.items():
                extra[k][i, :n] = torch.tensor(values)
        batch = {"input_ids": ids, "attention_mask": mask, **extra}
        return {k: v.to(self.device) for k, v in batch.items()}
