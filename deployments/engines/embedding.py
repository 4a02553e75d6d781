"""The embedding engine: any transformers ``AutoModel`` checkpoint, pooled as its sentence-transformers
files say, forward passes packed by token count.

Contracts:

- The engine applies an :class:`~deployments.engines.embedding_recipe.EmbeddingRecipe`: the pooling and
  normalisation that the checkpoint's sentence-transformers files name (``embedding_recipe.py``).
- :meth:`EmbeddingEngine.prepare` (synchronous, for a worker thread; concurrent calls must each pass a
  tokenizer of their own, since a fast tokenizer changes its truncation state during a call) turns a
  request's ``input`` (a string, strings, token ids, or lists of token ids) into token id rows:
  text is tokenized with the model's special tokens; token ids are the model's input as given (no special
  tokens added), each checked against the vocabulary. An input longer than :attr:`max_input_tokens` is a
  :class:`ContextLengthExceeded` (400) unless the request asks for truncation (``truncate_prompt_tokens``:
  a count, or -1 for the model's maximum): text is then cut by the tokenizer, keeping its special tokens
  (as sentence-transformers does), token ids by keeping the first tokens (the last with a tokenizer that
  truncates on the left).
- :meth:`EmbeddingEngine.submit` (the :class:`~deployments.engines.base.Engine` contract, from
  :class:`~deployments.engines.jobs.JobEngine`) queues jobs.
  When the model thread is free, every waiting job's rows (one @serve.batch admission holds several
  requests, each with several inputs) are sorted by length, longest first, and cut by :func:`plan_passes`
  into forward passes of at most ``max_batch_tokens`` padded tokens. A job's stream yields its one list of
  :class:`EmbeddingOutput` once its last row is embedded. Rows are right-padded and pooled under their
  attention mask, so a vector does not depend on its pass neighbours beyond float rounding (1e-5).
- ``dimensions`` other than the native size is allowed only for the sizes the spec lists as Matryoshka
  sizes: the first ``d`` components, L2-renormalised when the model normalises its output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from app.config import BatchingSpec
from app.errors import ContextLengthExceeded, InvalidRequest
from deployments.engines.jobs import JobEngine, JobStream
from deployments.engines.embedding_recipe import POOLERS, EmbeddingRecipe
from deployments.engines.embedding_records import EmbeddingOutput

logger = logging.getLogger(__name__)


def plan_passes(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Rows (indices into ``lengths``) cut into forward passes, longest rows first.

    Rows are sorted by length, longest first (ties keep their order), and a pass takes rows while
    ``rows x its first (longest) row's length`` stays within ``max_batch_tokens``; a row longer than the
    bound runs alone. Every row is in exactly one pass."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    for i in order:
        if passes and (len(passes[-1]) + 1) * lengths[passes[-1][0]] <= max_batch_tokens:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


# -- jobs and their streams --------------------------------------------------------------------------

@dataclass
class EmbeddingJob:
    """One request's inputs as token id rows, ready to embed."""

    rows: list[list[int]]
    dimensions: int | None = None  # a Matryoshka size to cut to; None = native
    cancelled: bool = False
    vectors: list[np.ndarray | None] = field(default_factory=list)  # filled by the model thread
    remaining: int = 0  # rows not embedded yet
    failed: bool = False


# -- the engine --------------------------------------------------------------------------------------

class EmbeddingEngine(JobEngine):
    """A loaded embedding model (see the module contract)."""

    def __init__(self, model, tokenizer, *, device: torch.device, recipe: EmbeddingRecipe, max_input_tokens: int,
                 max_batch_tokens: int = 8192, matryoshka_dimensions: Sequence[int] | None = None) -> None:
        super().__init__("embedding")
        self.model, self.tokenizer, self.device, self.recipe = model, tokenizer, device, recipe
        self.max_input_tokens = max_input_tokens
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.dimensions = len(recipe.pooling) * model.config.hidden_size
        self.matryoshka = tuple(sorted(set(matryoshka_dimensions or ()), reverse=True))
        too_big = [d for d in self.matryoshka if d > self.dimensions]
        if too_big:
            raise ValueError(f"matryoshka_dimensions {too_big} exceed the model's {self.dimensions} dimensions")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0  # masked out: any id in the vocabulary does
        self.special_tokens = tokenizer.num_special_tokens_to_add()
        self.passes = self.rows_embedded = self.tokens = self.padded_tokens = 0
        self._running = 0

    # -- the Engine contract (event loop) -----------------------------------------------------------

    async def _serve(self, streams: list[JobStream]) -> None:
        """Every input of ``streams`` in passes packed by token count, one model-thread call each: a
        request is answered once its last input is embedded, and a cancelled one's remaining inputs are
        skipped."""
        rows = [(s, i) for s in streams for i in range(len(s.job.rows))]
        for s in streams:
            s.job.vectors, s.job.remaining = [None] * len(s.job.rows), len(s.job.rows)
        self._running = len(streams)
        for planned in plan_passes([len(s.job.rows[i]) for s, i in rows], self.max_batch_tokens):
            live = [rows[k] for k in planned if not (rows[k][0].job.cancelled or rows[k][0].job.failed)]
            if not live:
                continue
            try:
                done = await self._on_model_thread(self._embed_pass, live)
            except Exception:  # a bug or a device failure: fail these requests, keep serving
                logger.exception("embedding pass failed")
                failed = list({id(s): s for s, _ in live}.values())
                for stream in failed:
                    stream.job.failed = True
                self._fail(failed)
                continue
            for stream, outputs in done:
                stream.set(outputs)
        self._running = 0

    def apply(self, batching: BatchingSpec) -> None:
        """Adopt ``max_batch_tokens`` (from the next group of passes on)."""
        self.max_batch_tokens = getattr(batching, "max_batch_tokens", self.max_batch_tokens)

    def stats(self) -> dict[str, Any]:
        return {"passes": self.passes, "inputs": self.rows_embedded, "tokens": self.tokens,
                "padded_tokens": self.padded_tokens, "waiting": len(self._waiting), "running": self._running,
                "context_len": self.max_input_tokens}  # /v1/models' max_model_len

    # -- per request (a worker thread) --------------------------------------------------------------

    def prepare(self, inputs: str | list[str] | list[int] | list[list[int]], *, truncate: int | None = None,
                dimensions: int | None = None, tokenizer: Any = None) -> EmbeddingJob:
        """``inputs`` (validated in shape by the wire model) as an :class:`EmbeddingJob`, tokenized by
        ``tokenizer`` (default the engine's); InvalidRequest (400) for a bad id, dimensions or truncation,
        ContextLengthExceeded for a too-long input."""
        cut = self._dimensions(dimensions)
        limit = self._truncation(truncate)
        single = isinstance(inputs, str) or isinstance(inputs[0], int)  # one input, not a list of them
        batch = [inputs] if single else list(inputs)
        names = ["input"] if single else [f"input[{i}]" for i in range(len(batch))]
        if isinstance(batch[0], str):
            rows = self._tokenize(tokenizer or self.tokenizer, batch, limit)
        else:
            rows = [self._check_ids(list(ids), name, limit) for name, ids in zip(names, batch)]
        for name, row in zip(names, rows):
            if len(row) > self.max_input_tokens:
                raise ContextLengthExceeded(
                    f"This model's maximum input length is {self.max_input_tokens} tokens, but {name} holds "
                    f"{len(row)} tokens. Shorten it, or set truncate_prompt_tokens (a token count, or -1 for "
                    "the model's maximum) to have it truncated.", param="input")
        return EmbeddingJob(rows=rows, dimensions=cut)

    def _dimensions(self, dimensions: int | None) -> int | None:
        if dimensions is None or dimensions == self.dimensions:
            return None
        if dimensions in self.matryoshka:
            return dimensions
        shorter = (f"it can only be shortened to {', '.join(map(str, self.matryoshka))}" if self.matryoshka
                   else "it was not trained to be shortened (not a Matryoshka model)")
        raise InvalidRequest(f"Invalid value for 'dimensions': this model's embeddings have {self.dimensions} "
                             f"dimensions, and {shorter}.", param="dimensions")

    def _truncation(self, truncate: int | None) -> int | None:
        if truncate is None:
            return None
        limit = self.max_input_tokens if truncate == -1 else truncate
        if not self.special_tokens < limit <= self.max_input_tokens:
            raise InvalidRequest(
                f"Invalid value for 'truncate_prompt_tokens': {truncate}; this model takes -1 (its maximum, "
                f"{self.max_input_tokens} tokens) or a count from {self.special_tokens + 1} to "
                f"{self.max_input_tokens}.", param="truncate_prompt_tokens")
        return limit

    def _tokenize(self, tokenizer: Any, texts: list[str], limit: int | None) -> list[list[int]]:
        if self.recipe.lower_case:
            texts = [t.lower() for t in texts]
        kwargs = {"truncation": True, "max_length": limit} if limit is not None else {"truncation": False}
        return tokenizer(texts, add_special_tokens=True, verbose=False, **kwargs)["input_ids"]

    def _check_ids(self, ids: list[int], where: str, limit: int | None) -> list[int]:
        for j, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise InvalidRequest(f"Invalid value for '{where}[{j}]': token id {token} is outside the model's "
                                     f"vocabulary (0 to {self.vocab_size - 1}).", param=f"{where}[{j}]")
        if limit is not None and len(ids) > limit:
            ids = ids[-limit:] if self.tokenizer.truncation_side == "left" else ids[:limit]
        return ids

    # -- per pass (the model thread) ----------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, rows: list[list[int]]) -> torch.Tensor:
        """Pooled (and, per the recipe, normalised) float32 vectors of ``rows``, one forward pass."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[k, :len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.to(hidden.dtype)
        pooled = torch.cat([POOLERS[mode](hidden, weights) for mode in self.recipe.pooling], dim=-1)
        if self.recipe.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        self.passes += 1
        self.rows_embedded += len(rows)
        self.tokens += sum(len(r) for r in rows)
        self.padded_tokens += len(rows) * width
        return pooled

    def _embed_pass(self, rows: list[tuple[JobStream, int]]) -> list[tuple[JobStream, list[EmbeddingOutput]]]:
        """Embed one planned pass; return the streams whose last row it was, with their outputs."""
        vectors = self.embed([s.job.rows[i] for s, i in rows]).cpu().numpy()
        finished = []
        for (stream, i), vector in zip(rows, vectors):
            job = stream.job
            job.vectors[i] = vector
            job.remaining -= 1
            if job.remaining == 0:
                finished.append((stream, self._outputs(job)))
        return finished

    def _outputs(self, job: EmbeddingJob) -> list[EmbeddingOutput]:
        out = []
        for index, (row, vector) in enumerate(zip(job.rows, job.vectors)):
            if job.dimensions is not None:
                vector = vector[:job.dimensions]
                if self.recipe.normalize:
                    vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            out.append(EmbeddingOutput(index=index, vector=np.asarray(vector, dtype="<f4").tobytes(),
                                       prompt_tokens=len(row)))
        return out
