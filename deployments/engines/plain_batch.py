"""The batch of a model whose KV cache cannot be concatenated (sliding-window or static layers):
transformers' own cache, one prefill group at a time, rows filtered by copying. Same interface as
:class:`deployments.engines.batch.Batch` (which the engine uses whenever the model allows it)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import DynamicCache

from deployments.engines.batch import forward, left_padded
from deployments.engines.vision import prefill_inputs


class PlainBatch:
    """The batch of a model whose cache is not plain full attention (sliding-window or static layers):
    transformers' own cache, one prefill group at a time (no :meth:`concatenate`), rows filtered by
    copying."""

    padded = True

    def __init__(self, rows: list[Any], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor
                 ) -> None:
        self.rows, self.cache, self.mask, self.positions = rows, cache, mask, positions
        self.next_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(cls, model: Any, rows: list[Any], prompts: Sequence[list[int]], pad_id: int,
                device: torch.device, fast: Any = None, images: dict[str, Any] | None = None
                ) -> tuple["PlainBatch", torch.Tensor]:
        """As :meth:`Batch.prefill`; ``fast`` is ignored (a fast decoder needs :class:`Batch`'s cache).
        With ``images``, the one prompt runs once and its cache rows are repeated for the ``n`` choices."""
        if images is not None:
            ids, mask = left_padded(prompts[:1], pad_id, device)
            inputs, after = prefill_inputs(model, ids, images)
        else:
            ids, mask = left_padded(prompts, pad_id, device)
            inputs, after = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}, None
        cache = DynamicCache(config=model.config)
        logits = forward(model, cache, input_ids=ids, logits_to_keep=1, **inputs).logits[:, -1, :]
        batch = cls(rows, cache, mask, mask.sum(-1) if after is None else torch.full_like(mask[:, 0], after))
        if len(prompts) > len(ids):  # the n choices of a request with images: one prefill, rows repeated
            index = mask.new_zeros(len(prompts))
            batch._select(index)
            logits = logits.index_select(0, index)
        return batch, logits

    def decode(self, model: Any, fast: Any = None) -> torch.Tensor:
        """As :meth:`Batch.decode`; ``fast`` is ignored (a fast decoder needs :class:`Batch`'s cache)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        out = forward(model, self.cache, input_ids=self.next_ids[:, None], attention_mask=self.mask,
                      position_ids=self.positions[:, None])
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def set_next(self, token_ids: list[int]) -> None:
        self.next_ids = torch.tensor(token_ids, dtype=torch.long, device=self.mask.device)

    def filter(self, keep: list[int]) -> "PlainBatch | None":
        if not keep:
            return None
        if len(keep) < len(self.rows):
            self._select(torch.tensor(keep, dtype=torch.long, device=self.mask.device))
            self.rows = [self.rows[i] for i in keep]
        return self

    def _select(self, index: torch.Tensor) -> None:
        """Rows become ``index`` (repeats allowed); ``rows`` is the caller's."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self.mask, self.positions = self.mask.index_select(0, index), self.positions.index_select(0, index)
        if self.next_ids is not None:
            self.next_ids = self.next_ids.index_select(0, index)
