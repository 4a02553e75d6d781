"""The tensors of a running batch and the operations on them (TGI-style): prefill, decode one step,
filter out finished rows, concatenate a newly prefilled batch into the running one.

Layout: rows are left-padded against a shared time axis. Every layer's keys/values, the attention mask
and the per-row state live in buffers with spare capacity (rows and columns): the live region is rows
``[:n]`` and columns ``[start:end]``. ``mask`` marks real tokens (1) against padding (0) for every cached
position; ``positions`` [rows] is the position id of the token in ``next_ids`` [rows], the last token
chosen for each row and not yet fed to the model. Position ids count real tokens only, so a row's
positions, and hence its outputs, are the same whatever padding its neighbours force on it.

Why buffers: with ``torch.cat`` / ``index_select`` every decode step, every join and every finished row
copied the whole KV cache of the batch (several times the cache per event: at 32 streams an event
happens about every step, and the copies cost more memory traffic than the step's own weights). Here a
decode step writes one column in place; a joining batch is written into spare rows, right-aligned to
the running batch's end (its left columns masked); a finished row is replaced by the last row (one row
copied); columns that became padding in every row are dropped by moving ``start``. Buffers are only
reallocated (one copy of the live region) when they run out of room, growing geometrically.

Everything here is synchronous and runs on the engine's model thread.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deployments.engines.vision import prefill_inputs

_SPARE_COLUMNS = 32  # at least this many free columns after a (re)allocation
_SPARE_ROWS = 8


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` [rows, longest prompt] on ``device``: each prompt right-aligned after ``pad_id``
    padding, the mask 1 on real tokens."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    """The forward's keyword for the KV cache: transformers 5 renamed ``past_key_values`` to ``cache``
    (the old name is deprecated and goes in 5.40); remote-code models may still use the old one."""
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def forward(model: Any, cache: DynamicCache, **inputs: Any) -> Any:
    """``model(**inputs)`` with ``cache`` as its KV cache (updated in place), whatever the keyword."""
    return model(**inputs, **{_cache_keyword(type(model)): cache}, use_cache=True)


class _Geometry:
    """The live region shared by all layers and the mask of one batch: rows [:n], columns [start:end]."""

    __slots__ = ("n", "start", "end")

    def __init__(self, n: int, start: int = 0, end: int = 0) -> None:
        self.n, self.start, self.end = n, start, end


class SlotLayer(DynamicLayer):
    """One full-attention layer's keys/values in buffers [row_cap, heads, col_cap, dim].

    ``update`` (called by the model) writes the new positions at ``geometry.end`` in place and returns
    the live views; the :class:`Batch` moves ``end`` after the forward pass, and reallocates through
    :meth:`reserve` before a forward pass could overflow a buffer.
    """

    def __init__(self, geometry: _Geometry) -> None:
        super().__init__()
        self.geometry = geometry
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.geometry
        q = key_states.shape[-2]
        if self.k_buf is None:
            self.lazy_initialization(key_states, value_states)
            rows, heads, _, dim = key_states.shape
            shape = (rows, heads, g.end + q + _SPARE_COLUMNS, dim)
            self.k_buf, self.v_buf = key_states.new_zeros(shape), value_states.new_zeros(shape)
        self.k_buf[:g.n, :, g.end:g.end + q] = key_states
        self.v_buf[:g.n, :, g.end:g.end + q] = value_states
        self.keys, self.values = self.k_buf[:g.n, :, g.start:g.end + q], self.v_buf[:g.n, :, g.start:g.end + q]
        return self.keys, self.values

    def fill(self, keys: torch.Tensor, values: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor],
             width: int) -> None:
        """Prefill into an empty layer: buffers for the geometry's rows and ``width`` columns (plus spare),
        zero but for packed ``keys``/``values`` [tokens, heads, dim] written at (row, column) ``index``."""
        g = self.geometry
        self.lazy_initialization(keys, values)
        shape = (g.n, keys.shape[1], width + _SPARE_COLUMNS, keys.shape[2])
        self.k_buf, self.v_buf = keys.new_zeros(shape), values.new_zeros(shape)
        self.k_buf.transpose(1, 2)[index] = keys  # [rows, columns, heads, dim] views of the buffers
        self.v_buf.transpose(1, 2)[index] = values

    def sync(self) -> None:
        """Point ``keys``/``values`` at the live region (after the geometry changed)."""
        g = self.geometry
        self.keys, self.values = self.k_buf[:g.n, :, g.start:g.end], self.v_buf[:g.n, :, g.start:g.end]

    def reserve(self, rows: int, left: int, right: int) -> None:
        """Reallocate so that ``rows`` rows, ``left`` free columns before the live region and ``right``
        free columns after it fit; copies the live region once. The geometry's start/end move with it."""
        g = self.geometry
        cols = left + (g.end - g.start) + right
        shape = (rows, self.k_buf.shape[1], cols, self.k_buf.shape[3])
        k, v = self.k_buf.new_zeros(shape), self.v_buf.new_zeros(shape)
        k[:g.n, :, left:left + g.end - g.start] = self.k_buf[:g.n, :, g.start:g.end]
        v[:g.n, :, left:left + g.end - g.start] = self.v_buf[:g.n, :, g.start:g.end]
        self.k_buf, self.v_buf = k, v


class Batch:
    """A left-padded batch with its KV cache. Rows correspond to ``rows[i]`` (opaque to this class);
    :meth:`filter` may reorder them (``rows`` is reordered the same way)."""

    def __init__(self, rows: list[Any], cache: DynamicCache, geometry: _Geometry, mask: torch.Tensor,
                 positions: torch.Tensor, next_ids: torch.Tensor | None = None) -> None:
        self.rows = rows
        self.cache = cache
        self.geometry = geometry
        self._mask = mask  # buffer [row_cap, col_cap], same columns as the layers' buffers
        self._positions = positions  # buffer [row_cap]
        self._next_ids = next_ids  # buffer [row_cap] once set
        self.padded = True  # whether the live mask may hold a 0 (else decode passes no mask at all)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def mask(self) -> torch.Tensor:
        g = self.geometry
        return self._mask[:g.n, g.start:g.end]

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[:self.geometry.n]

    @property
    def next_ids(self) -> torch.Tensor | None:
        return None if self._next_ids is None else self._next_ids[:self.geometry.n]

    @property
    def layers(self) -> list[SlotLayer]:
        return self.cache.layers

    @classmethod
    def prefill(cls, model: Any, rows: list[Any], prompts: Sequence[list[int]], pad_id: int,
                device: torch.device, fast: Any = None, images: dict[str, Any] | None = None
                ) -> tuple["Batch", torch.Tensor]:
        """Run the prompts through the model; return the batch and the last-position logits [rows, V].
        ``fast`` (a :class:`~deployments.engines.fast_decode.FastDecoder` of ``model``) computes the same
        prefill in fewer ops (equal up to float rounding). ``images`` (the processor's tensors of one
        request's images: every prompt is that request's) enter the model's forward here
        (``deployments.engines.vision``); ``fast`` is then not used.

        Identical prompts (the ``n`` choices of one request) are computed once and their cache rows
        copied, so ``n > 1`` costs one prefill.
        """
        unique: dict[tuple[int, ...], int] = {}
        order = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        distinct = list(unique)
        ids, mask = left_padded(distinct, pad_id, device)
        geometry = _Geometry(len(distinct))
        cache = new_cache(model, geometry)
        padded = bool((mask == 0).any())
        positions = mask.sum(-1)
        if images is not None:
            inputs, after = prefill_inputs(model, ids, images)
            logits = forward(model, cache, input_ids=ids, logits_to_keep=1, **inputs).logits[:, -1, :]
            positions = torch.full_like(positions, after)
        elif fast is not None:  # packs the prompts itself: the padded ids serve only as the forward's input
            logits = fast.prefill(distinct, cache.layers)
        else:
            logits = forward(model, cache, input_ids=ids, attention_mask=mask if padded else None,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1
                             ).logits[:, -1, :]
        geometry.end = ids.shape[1]
        cols = cache.layers[0].k_buf.shape[2]
        mask_buf = mask.new_zeros((len(distinct), cols))
        mask_buf[:, :mask.shape[1]] = mask
        batch = cls(rows, cache, geometry, mask_buf, positions)
        batch.padded = padded
        if len(distinct) < len(prompts):
            index = torch.tensor(order, dtype=torch.long, device=mask.device)
            batch._repeat(index)
            logits = logits.index_select(0, index)
        for layer in batch.layers:
            layer.sync()
        return batch, logits

    def decode(self, model: Any, fast: Any = None) -> torch.Tensor:
        """Feed ``next_ids``; return the logits for the following token [rows, V]. ``fast`` (a
        :class:`~deployments.engines.fast_decode.FastDecoder` of ``model``) computes the same step in
        fewer ops (equal up to float rounding)."""
        inputs = self.step_inputs()
        if fast is not None:
            logits = fast(*inputs)
        else:
            ids, positions, mask, _ = inputs
            logits = forward(model, self.cache, input_ids=ids[:, None], attention_mask=mask,
                             position_ids=positions[:, None]).logits[:, -1, :]
        self.stepped()
        return logits

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[SlotLayer]]:
        """``(ids, positions, mask or None, cache layers)`` of the next decode step, with room for its
        column; call :meth:`stepped` once the step wrote it."""
        g = self.geometry
        if g.end == self._mask.shape[1]:
            self._reserve(self._mask.shape[0], 0, max(_SPARE_COLUMNS, (g.end - g.start) // 2))
        self._mask[:g.n, g.end] = 1
        mask = self._mask[:g.n, g.start:g.end + 1] if self.padded else None
        return self.next_ids, self.positions, mask, self.layers

    def stepped(self) -> None:
        self.geometry.end += 1
        self._positions[:self.geometry.n] += 1

    @property
    def width(self) -> int:
        """Columns every row attends over (its own tokens and the padding its neighbours force on it)."""
        return self.geometry.end - self.geometry.start

    def set_next(self, token_ids: list[int]) -> None:
        tokens = torch.tensor(token_ids, dtype=torch.long, device=self._mask.device)
        if self._next_ids is None:
            self._next_ids = tokens.new_zeros(self._mask.shape[0])
        self._next_ids[:len(token_ids)] = tokens

    def filter(self, keep: list[int]) -> "Batch | None":
        """Keep only rows ``keep`` (indices into ``rows``): each removed row is overwritten by a kept row
        from the end of the batch, so only moved rows are copied; columns that became padding in every
        kept row are dropped. ``rows`` is reordered like the tensors."""
        if not keep:
            return None
        n = len(self.rows)
        if len(keep) == n:
            return self
        g = self.geometry
        kept = set(keep)
        size = len(keep)
        holes = [i for i in range(size) if i not in kept]  # slots to refill
        movers = [i for i in keep if i >= size]  # kept rows beyond the new end
        rows = list(self.rows)
        if holes:
            dst = torch.tensor(holes, dtype=torch.long, device=self._mask.device)
            src = torch.tensor(movers, dtype=torch.long, device=self._mask.device)
            for layer in self.layers:
                layer.k_buf[dst] = layer.k_buf[src]
                layer.v_buf[dst] = layer.v_buf[src]
            for buf in (self._mask, self._positions, self._next_ids):
                if buf is not None:
                    buf[dst] = buf[src]
            for d, s in zip(holes, movers):
                rows[d] = rows[s]
        self.rows = rows[:size]
        g.n = size
        live = self._mask[:size, g.start:g.end].any(dim=0)
        g.start += int(live.nonzero()[0]) if bool(live.any()) else g.end - g.start
        self.padded = bool((self._mask[:size, g.start:g.end] == 0).any())
        for layer in self.layers:
            layer.sync()
        return self

    def concatenate(self, other: "Batch") -> "Batch":
        """Append ``other``'s rows to this batch in place: its live columns are right-aligned to this
        batch's end, columns to their left are padding for them (and the other way round when ``other``
        is the wider one)."""
        g, o = self.geometry, other.geometry
        width, theirs = g.end - g.start, o.end - o.start
        rows = g.n + o.n
        row_cap, col_cap = self._mask.shape
        if rows > row_cap or theirs - width > g.start:  # out of rows, or of free columns on the left
            self._reserve(row_cap if rows <= row_cap else max(2 * row_cap, rows + _SPARE_ROWS),
                          max(0, theirs - width), max(_SPARE_COLUMNS, col_cap - g.end))
        if theirs > width:  # expose columns on the left: padding for the rows already here
            new_start = g.end - theirs
            for layer in self.layers:
                layer.k_buf[:g.n, :, new_start:g.start] = 0
                layer.v_buf[:g.n, :, new_start:g.start] = 0
            self._mask[:g.n, new_start:g.start] = 0
            g.start = new_start
            self.padded = True
        lo = g.end - theirs
        for mine, their in zip(self.layers, other.layers):
            for buf, src in ((mine.k_buf, their.k_buf), (mine.v_buf, their.v_buf)):
                buf[g.n:rows, :, g.start:lo] = 0
                buf[g.n:rows, :, lo:g.end] = src[:o.n, :, o.start:o.end]
        self._mask[g.n:rows, g.start:lo] = 0
        self._mask[g.n:rows, lo:g.end] = other._mask[:o.n, o.start:o.end]
        self._positions[g.n:rows] = other.positions
        if self._next_ids is None:
            self._next_ids = self._positions.new_zeros(self._mask.shape[0])
        self._next_ids[g.n:rows] = other.next_ids
        self.padded = self.padded or other.padded or lo > g.start
        g.n = rows
        self.rows = self.rows + other.rows
        for layer in self.layers:
            layer.sync()
        return self

    def _reserve(self, rows: int, left: int, right: int) -> None:
        """Reallocate every buffer for ``rows`` rows and ``left``/``right`` free columns around the live
        region (one copy of it); the live region then starts at column ``left``."""
        g = self.geometry
        for layer in self.layers:
            layer.reserve(rows, left, right)
        width = g.end - g.start
        mask = self._mask.new_zeros((rows, left + width + right))
        mask[:g.n, left:left + width] = self._mask[:g.n, g.start:g.end]
        self._mask = mask
        for name in ("_positions", "_next_ids"):
            buf = getattr(self, name)
            if buf is not None:
                grown = buf.new_zeros(rows)
                grown[:g.n] = buf[:g.n]
                setattr(self, name, grown)
        g.start, g.end = left, left + width

    def _repeat(self, index: torch.Tensor) -> None:
        """Rows become ``index`` (repeats allowed), right after prefill; ``rows`` is the caller's."""
        g = self.geometry
        for layer in self.layers:
            layer.k_buf, layer.v_buf = layer.k_buf.index_select(0, index), layer.v_buf.index_select(0, index)
        self._mask = self._mask.index_select(0, index)
        self._positions = self._positions.index_select(0, index)
        g.n = len(index)


def new_cache(model: Any, geometry: _Geometry) -> DynamicCache:
    """A DynamicCache for ``model`` whose layers are :class:`SlotLayer` over ``geometry``."""
    cache = DynamicCache(config=model.config)
    cache.layers = [SlotLayer(geometry) for _ in cache.layers]
    return cache


def supports_concatenation(model: Any) -> bool:
    """Continuous batching needs plain per-layer key/value tensors (no sliding or static layers)."""
    probe = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in probe.layers)
