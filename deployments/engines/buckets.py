"""The running rows of a continuous-batching engine, kept as a few batches of similar width.

A :class:`~deployments.engines.batch.Batch`'s rows share one time axis, so each row attends over the
batch's whole width: a row that joined with a 20-token prompt beside one of 400 tokens reads 400-odd
columns of keys and values a step, nearly all padding. :class:`Buckets` keeps the rows in up to
:data:`MAX_BUCKETS` batches instead: a prefilled batch joins the bucket where it adds the least padding,
or starts its own when every join would add more than :data:`SPLIT_PADDING` padded (row, column) cells.
A decode step still reads the weights once: :meth:`FastDecoder.step` runs the matrix products over
every bucket's rows together and attention per bucket. Buckets that become alike after rows leave are
merged again.

Why the threshold: on the bench model (2 threads) a padded cell costs about 0.9 µs per step (8
layers; 31 against 20 ms for a 32-row step at widths 430 and 65), and each extra bucket adds about
0.4 ms of small ops per step.

Only the lean step reads the weights once for all buckets; the engine keeps a model that runs through
the transformers forward in one bucket (``max_buckets=1``), since there each bucket is a forward of its
own.

Buckets behave as one batch for the engine (``rows``, ``decode``, ``set_next``, ``filter``,
``concatenate``); a row's output does not depend on which bucket holds it.
"""

from __future__ import annotations

from typing import Any

import torch

from deployments.engines.batch import Batch

MAX_BUCKETS = 4
SPLIT_PADDING = 512  # padded (row, column) cells a join may add before the batch gets a bucket of its own


def _padding(a: Batch, b: Batch) -> int:
    """Padded cells that concatenating ``a`` and ``b`` adds: the narrower one's rows widen to the other."""
    wide = max(a.width, b.width)
    return len(a) * (wide - a.width) + len(b) * (wide - b.width)


class Buckets:
    """The running batches of an engine; see the module docstring."""

    def __init__(self, batch: Batch, max_buckets: int = MAX_BUCKETS) -> None:
        self.batches = [batch]
        self.max_buckets = max_buckets

    @property
    def rows(self) -> list[Any]:
        """Every row, in bucket order (the order of :meth:`decode`'s logits)."""
        return [row for batch in self.batches for row in batch.rows]

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def concatenate(self, other: Batch) -> "Buckets":
        """Add a prefilled batch: into the bucket where it adds the least padding, or as a bucket of its
        own when that is more than :data:`SPLIT_PADDING` and there is room for another."""
        best = min(self.batches, key=lambda batch: _padding(batch, other))
        if _padding(best, other) > SPLIT_PADDING and len(self.batches) < self.max_buckets:
            self.batches.append(other)
        else:
            best.concatenate(other)
        return self

    def decode(self, model: Any, fast: Any = None) -> torch.Tensor:
        """One decode step of every row: logits [rows, V] in :attr:`rows` order."""
        if len(self.batches) == 1:
            return self.batches[0].decode(model, fast)
        if fast is None:  # the transformers forward: one call per bucket
            return torch.cat([batch.decode(model) for batch in self.batches])
        logits = fast.step([batch.step_inputs() for batch in self.batches])
        for batch in self.batches:
            batch.stepped()
        return logits

    def set_next(self, token_ids: list[int]) -> None:
        start = 0
        for batch in self.batches:
            batch.set_next(token_ids[start:start + len(batch)])
            start += len(batch)

    def filter(self, keep: list[int]) -> "Buckets | None":
        """Keep rows ``keep`` (indices into :attr:`rows`); empty buckets go, and buckets that a join
        would no longer pad by more than :data:`SPLIT_PADDING` merge."""
        if len(keep) == len(self):
            return self
        kept: list[Batch] = []
        wanted, start = sorted(keep), 0
        for batch in self.batches:
            end = start + len(batch)
            if (batch := batch.filter([i - start for i in wanted if start <= i < end])) is not None:
                kept.append(batch)
            start = end
        self.batches = kept
        self._merge()
        return self if self.batches else None

    def _merge(self) -> None:
        while len(self.batches) > 1:
            pairs = [(a, b) for i, a in enumerate(self.batches) for b in self.batches[i + 1:]]
            a, b = min(pairs, key=lambda pair: _padding(*pair))
            if _padding(a, b) > SPLIT_PADDING:
                return
            # The smaller batch's rows are the ones copied.
            big, small = (a, b) if len(a) >= len(b) else (b, a)
            big.concatenate(small)
            self.batches.remove(small)
