"""The tensors of a running batch and the operations on them (TGI-style): prefill, decode one step,
filter out finished rows, concatenate a newly prefilled batch into the running one.

Layout: rows are left-padded. ``mask`` [rows, T] marks real tokens (1) against padding (0) for every
cached position; ``positions`` [rows] is the position id of the token in ``next_ids`` [rows], the last
token chosen for each row and not yet fed to the model. Position ids count real tokens only, so a row's
positions, and hence its outputs, are the same whatever padding its neighbours force on it.

Everything here is synchronous and runs on the engine's model thread.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class Batch:
    """A left-padded batch with its KV cache. Rows correspond to ``rows[i]`` (opaque to this class)."""

    def __init__(self, rows: list[Any], cache: DynamicCache, mask: torch.Tensor,
                 positions: torch.Tensor, next_ids: torch.Tensor | None = None) -> None:
        self.rows = rows
        self.cache = cache
        self.mask = mask
        self.positions = positions
        self.next_ids = next_ids

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(cls, model: Any, rows: list[Any], prompts: Sequence[list[int]], pad_id: int,
                device: torch.device) -> tuple["Batch", torch.Tensor]:
        """Run the prompts through the model; return the batch and the last-position logits [rows, V].

        Identical prompts (the ``n`` choices of one request) are computed once and their cache rows
        copied, so ``n > 1`` costs one prefill.
        """
        unique: dict[tuple[int, ...], int] = {}
        order = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        distinct = list(unique)
        width = max(map(len, distinct))
        ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for i, prompt in enumerate(distinct):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                    past_key_values=new_cache(model), use_cache=True, logits_to_keep=1)
        batch = cls(rows, out.past_key_values, mask, mask.sum(-1))
        logits = out.logits[:, -1, :]
        if len(distinct) < len(prompts):
            index = torch.tensor(order, dtype=torch.long, device=mask.device)
            batch._select(index)
            logits = logits.index_select(0, index)
        return batch, logits

    def decode(self, model: Any) -> torch.Tensor:
        """Feed ``next_ids``; return the logits for the following token [rows, V]."""
        mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        out = model(input_ids=self.next_ids[:, None], attention_mask=mask,
                    position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True)
        self.mask = mask
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def set_next(self, token_ids: list[int]) -> None:
        self.next_ids = torch.tensor(token_ids, dtype=torch.long, device=self.mask.device)

    def filter(self, keep: list[int]) -> "Batch | None":
        """Keep only rows ``keep`` (indices into ``rows``); drop columns that became all padding."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self._select(index)
        self.rows = [self.rows[i] for i in keep]
        first = int(self.mask.any(dim=0).nonzero()[0])  # columns that are padding in every kept row
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:, :], layer.values[:, :, first:, :]
            self.mask = self.mask[:, first:]
        return self

    def _select(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the tensor rows ``index``, in that order; ``rows`` is the caller's job."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.next_ids is not None:
            self.next_ids = self.next_ids.index_select(0, index)

    def concatenate(self, other: "Batch") -> "Batch":
        """Append ``other``'s rows to this batch, left-padding whichever is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        mine, theirs = self._padded_to(width), other._padded_to(width)
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([mine(a.keys), theirs(b.keys)], dim=0)
            a.values = torch.cat([mine(a.values), theirs(b.values)], dim=0)
        mask = torch.cat([mine(self.mask), theirs(other.mask)], dim=0)
        return Batch(self.rows + other.rows, self.cache, mask,
                     torch.cat([self.positions, other.positions]), torch.cat([self.next_ids, other.next_ids]))

    def _padded_to(self, width: int):
        extra = width - self.mask.shape[1]

        def pad(t: torch.Tensor) -> torch.Tensor:
            if extra == 0:
                return t
            # The cache is [rows, heads, T, dim]; the mask is [rows, T]: pad the T axis on the left.
            shape = list(t.shape)
            axis = 2 if t.dim() == 4 else 1
            shape[axis] = extra
            return torch.cat([t.new_zeros(shape), t], dim=axis)

        return pad


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values live in a buffer with spare room along the sequence
    axis: a decode step writes its token in place instead of copying the whole cache (``torch.cat``
    in :class:`DynamicLayer` costs a full copy per layer per step). ``keys``/``values`` stay the views
    the model and :class:`Batch` see; when Batch replaces them (filter, concatenate), the next update
    moves them into a fresh buffer."""

    _SPARE_MIN = 32

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        k_buf, v_buf = self._buffers if self._buffers is not None else (None, None)
        if (k_buf is None or end > k_buf.shape[-2] or self.keys.data_ptr() != k_buf.data_ptr()
                or self.keys.shape[0] != k_buf.shape[0]):
            shape = (*key_states.shape[:2], end + max(self._SPARE_MIN, end // 2), key_states.shape[-1])
            k_buf, v_buf = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                k_buf[:, :, :length] = self.keys
                v_buf[:, :, :length] = self.values
            self._buffers = (k_buf, v_buf)
        k_buf[:, :, length:end] = key_states
        v_buf[:, :, length:end] = value_states
        self.keys, self.values = k_buf[:, :, :end], v_buf[:, :, :end]
        return self.keys, self.values


def new_cache(model: Any) -> DynamicCache:
    """A DynamicCache for ``model``, with in-place growing layers where every layer is full attention."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def supports_concatenation(model: Any) -> bool:
    """Continuous batching needs plain per-layer key/value tensors (no sliding or static layers)."""
    probe = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in probe.layers)
