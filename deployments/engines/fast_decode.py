"""A lean decode step for Llama-family decoders: the same arithmetic as the transformers forward, less
Python around it.

At small batches a CPU decode step is a few milliseconds of weight reads plus a few milliseconds of
per-call Python in transformers' forward (module hooks, keyword plumbing, output records, mask and cache
bookkeeping): 3-4 ms of a 13 ms step for the 24M-parameter bench model on one thread. :class:`FastDecoder`
runs one decode step (one new token per row) straight through the model's own weights and functions:
each norm's, activation's and rotary embedding's ``forward``, the model family's
``apply_rotary_pos_emb`` and transformers' attention function, with ``F.linear`` for the projections,
exactly as ``nn.Linear`` calls it. It computes what the full forward computes, op for op, so logits are
bit-identical to it (tested per supported family, padded and unpadded); only the wiring is ours.

Families are looked up in :data:`FAMILIES` by ``config.model_type``; :func:`fast_decoder` returns None for
anything else (other families, another attention implementation, quantized or patched modules), and the
engine then calls the model's forward as before.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from deployments.engines.batch import SlotLayer

# model_type -> whether its attention normalises q and k per head (Qwen3) before the rotary embedding.
FAMILIES: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}


@dataclass(frozen=True)
class _Layer:
    attn: Any  # the attention module (transformers' attention function reads its attributes)
    norm_in: Callable[[torch.Tensor], torch.Tensor]
    norm_post: Callable[[torch.Tensor], torch.Tensor]
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    act: Callable[[torch.Tensor], torch.Tensor]


def _linear(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if type(module) is not torch.nn.Linear:
        raise TypeError(f"{type(module).__name__} is not a plain nn.Linear")
    return module.weight, module.bias


class FastDecoder:
    """One decode step of ``model`` over a :class:`~deployments.engines.batch.Batch`'s cache layers."""

    def __init__(self, model: Any, qk_norm: bool) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        base = model.model
        self.embed = base.embed_tokens.weight
        self.rotary = base.rotary_emb.forward
        self.norm = base.norm.forward
        self.lm_head = _linear(model.lm_head)
        self.attention = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
        family = sys.modules[type(base.layers[0].self_attn).__module__]
        self.apply_rotary = family.apply_rotary_pos_emb
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                attn=attn, norm_in=layer.input_layernorm.forward, norm_post=layer.post_attention_layernorm.forward,
                q=_linear(attn.q_proj), k=_linear(attn.k_proj), v=_linear(attn.v_proj), o=_linear(attn.o_proj),
                q_norm=attn.q_norm.forward if qk_norm else None, k_norm=attn.k_norm.forward if qk_norm else None,
                gate=_linear(mlp.gate_proj), up=_linear(mlp.up_proj), down=_linear(mlp.down_proj),
                act=mlp.act_fn.forward))

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache_layers: list[SlotLayer]) -> torch.Tensor:
        """Logits [rows, vocab] for ``ids`` [rows] at ``positions`` [rows]; ``mask`` [rows, cached + 1]
        (1 = attend) or None when no row is padded. Writes each layer's new key/value into its cache."""
        rows = ids.shape[0]
        x = F.embedding(ids[:, None], self.embed)
        cos, sin = self.rotary(x, positions[:, None])
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        for layer, cache in zip(self.layers, cache_layers):
            attn = layer.attn
            shape = (rows, 1, -1, attn.head_dim)
            h = layer.norm_in(x)
            q = F.linear(h, *layer.q).view(shape)
            k = F.linear(h, *layer.k).view(shape)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = F.linear(h, *layer.v).view(shape).transpose(1, 2)
            keys, values = cache.update(k, v)
            out, _ = self.attention(attn, q, keys, values, attn_mask, dropout=0.0, scaling=attn.scaling,
                                    sliding_window=None)
            x = x + F.linear(out.reshape(rows, 1, -1).contiguous(), *layer.o)
            h = layer.norm_post(x)
            x = x + F.linear(layer.act(F.linear(h, *layer.gate)) * F.linear(h, *layer.up), *layer.down)
        return F.linear(self.norm(x), *self.lm_head)[:, -1, :]


def fast_decoder(model: Any) -> FastDecoder | None:
    """A :class:`FastDecoder` for ``model``, or None when this step would not reproduce its forward (a
    family not in :data:`FAMILIES`, attention other than sdpa, sliding-window layers, modules that are
    not the plain ones)."""
    config = getattr(model, "config", None)
    qk_norm = FAMILIES.get(getattr(config, "model_type", None))
    if qk_norm is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # e.g. Mistral: one sliding_window for every layer, when set
        full_attention = getattr(config, "sliding_window", None) is None
    else:
        full_attention = all(t == "full_attention" for t in layer_types)
    if not full_attention:
        return None
    try:
        return FastDecoder(model, qk_norm)
    except (AttributeError, TypeError, KeyError):
        return None
