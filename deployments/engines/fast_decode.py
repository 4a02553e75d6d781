"""A lean forward for Llama-family decoders: the transformers forward's arithmetic in fewer ops, for the
prefill and for each decode step.

At small batches a CPU decode step is a few milliseconds of weight reads plus a few milliseconds of
per-op overhead: the forward's Python (module hooks, keyword plumbing, output records, mask and cache
bookkeeping) and its many small tensor ops, about 300 per step for an 8-layer model. :class:`FastDecoder`
runs one decode step (one new token per row) with the same weights and the same formulas in fewer ops:

- the q, k and v projections are one matrix product, and so are gate and up: at construction each
  layer's weights are concatenated once and the model's own ``nn.Linear`` weights become views into the
  concatenation, so no memory is added and the model's forward reads the same storage;
- RMSNorm is ``torch.rms_norm`` (one op instead of six);
- the rotary embedding turns q and k together, with the model's own ``cos``/``sin``;
- attention over the cache is two batched matrix products and a softmax, grouped by key/value head
  (no repeated keys, no per-step mask conversion per layer);
- on a CPU in float32 the matrix products read a copy of the weights laid out once for a kernel
  (``packed``; ``packed_weights: false`` in the model's spec turns it off): otherwise the matrix library
  re-lays the weights out in every product, which at 2 to 32 rows costs as much as the arithmetic
  (README, The decode step). That is oneDNN's layout, and for products of up to 8 rows (decode steps
  of a few streams) also the panels of :mod:`~deployments.engines.product_kernel` where the machine can
  build it (``product_kernel: false`` turns it off), which is faster than oneDNN there.

:meth:`FastDecoder.prefill` runs a group of prompts the same way, packed into one sequence without
padding (attention through ``scaled_dot_product_attention``, causal within each prompt), and computes the
last layer's attention and MLP for each prompt's last token only, the one whose logits are used.

The results equal the forward's up to float rounding (different summation order in a fused op), not
bit for bit: ``tests/unit/test_fast_decode.py`` checks that logits stay within 1e-4 of the forward's, that
greedy decoding picks the same tokens and that the cache holds the same keys/values, for every family,
padded and not. ``fast_decode: false`` in a model's spec runs the transformers forward instead.

Families are looked up in :data:`FAMILIES` by ``config.model_type``; :func:`fast_decoder` returns None for
anything else (other families, another attention implementation, sliding-window layers, partial rotary,
quantized or patched modules), and the engine then calls the model's forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from deployments.engines.batch import SlotLayer
from deployments.engines.product_kernel import KERNEL_ROWS, Product, panel_product

# model_type -> whether its attention normalises q and k per head (Qwen3) before the rotary embedding.
FAMILIES: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True,
                            # the language models of Qwen2-VL and Qwen2.5-VL: Qwen2 layers; their multimodal
                            # rotary embedding is plain RoPE for text positions (every component equal)
                            "qwen2_vl_text": False, "qwen2_5_vl_text": False}

# The RMSNorm classes of those families: weight * x / sqrt(mean(x^2) + eps), computed in float32.
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}

Norm = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Layer:
    norm_in: Norm
    norm_post: Norm
    qkv: Product  # q, k, v projections stacked
    o: Product
    q_norm: Norm | None
    k_norm: Norm | None
    gate_up: Product  # gate and up projections stacked
    down: Product
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def _linear(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if type(module) is not torch.nn.Linear:
        raise TypeError(f"{type(module).__name__} is not a plain nn.Linear")
    return module.weight, module.bias


def _stack(modules: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for ``modules``' outputs side by side. The modules' parameters become views
    of it, so the stacked copy replaces theirs rather than adding to memory."""
    weights, biases = zip(*map(_linear, modules))
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or weights[0].device.type == "meta":
        raise TypeError("projections differ in dtype, device or input width, or are offloaded")
    weight = torch.cat([w.detach() for w in weights])
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0])
                          for w, b in zip(weights, biases)])
    row = 0
    for module, w, b in zip(modules, weights, biases):
        rows = slice(row, row + w.shape[0])
        module.weight = torch.nn.Parameter(weight[rows], requires_grad=False)
        if b is not None:
            module.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
        row += w.shape[0]
    return weight, bias


# The batch size oneDNN lays the packed weights out for. Any of 4 to 32 measured alike for products of 1
# to 512 rows; 1 was slower at every size.
_PACK_ROWS = 8


@functools.cache
def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a :class:`FastDecoder` of weights on ``device`` in ``dtype`` multiplies by oneDNN-packed
    copies (``packed``): float32 on a CPU, where this torch can, checked once on a small product against
    ``F.linear``."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.linspace(-1, 1, 24 * 16).reshape(24, 16)
        x = torch.linspace(-2, 2, 3 * 16).reshape(3, 16)
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, _PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, F.linear(x, probe), rtol=1e-5, atol=1e-5))


def _norm(module: Any) -> Norm:
    """The module's RMSNorm as one op, or its own forward for any other norm."""
    if type(module).__name__ in _RMS_NORMS:
        shape, weight, eps = (module.weight.shape[-1],), module.weight, module.variance_epsilon
        return lambda x: torch.rms_norm(x, shape, weight, eps)
    return module.forward


class FastDecoder:
    """The prefill and one decode step of ``model`` over a :class:`~deployments.engines.batch.Batch`'s
    cache layers."""

    def __init__(self, model: Any, qk_norm: bool, packed: bool = True, product_kernel: bool = True) -> None:
        base, config = text_stack(model)
        self.embed = base.embed_tokens.weight
        self.rotary = base.rotary_emb.forward
        self.norm = _norm(base.norm)
        first = base.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        probe = torch.zeros(1, 1, 1, dtype=self.embed.dtype, device=self.embed.device)
        cos, _ = self.rotary(probe, torch.zeros(1, 1, dtype=torch.long, device=self.embed.device))
        if cos.shape[-1] != self.head_dim or self.heads % self.kv_heads:
            raise TypeError("partial rotary embedding or uneven head grouping")
        if any(layer.self_attn.head_dim != self.head_dim for layer in base.layers):
            raise TypeError("layers differ in head_dim")
        # Checked above before any weight is stacked or packed: a model this step cannot compute is left as
        # it was, at no cost.
        self.packed = packed and packs_weights(self.embed.device, self.embed.dtype)
        self.packed_bytes = 0  # memory the packed copies take
        self.product_kernel = product_kernel
        self.kernel_products = 0  # products that go through the product kernel
        self.lm_head = self._product(*_linear(model.lm_head))
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                norm_in=_norm(layer.input_layernorm), norm_post=_norm(layer.post_attention_layernorm),
                qkv=self._product(*_stack([attn.q_proj, attn.k_proj, attn.v_proj])),
                o=self._product(*_linear(attn.o_proj)),
                q_norm=_norm(attn.q_norm) if qk_norm else None, k_norm=_norm(attn.k_norm) if qk_norm else None,
                gate_up=self._product(*_stack([mlp.gate_proj, mlp.up_proj])),
                down=self._product(*_linear(mlp.down_proj)),
                act=mlp.act_fn.forward, scaling=attn.scaling))

    def _product(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
        """``x -> x @ weight.T + bias``. When packed, through a copy of ``weight`` in oneDNN's blocked
        layout: the same product 1.1-1.8x faster at 2 to 128 rows, because the matrix library no longer
        re-lays the weights out in every call. With ``product_kernel`` too, a product of up to
        ``KERNEL_ROWS`` rows goes through :mod:`~deployments.engines.product_kernel` where this machine
        has it (another copy, in its panels), which is faster than oneDNN there."""
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        if not self.packed:
            return lambda x: F.linear(x, weight, bias)
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
        self.packed_bytes += blocked.numel() * blocked.element_size()
        many: Product = lambda x: torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")
        few = panel_product(weight, bias) if self.product_kernel else None
        if few is None:
            return many
        self.kernel_products += 1
        self.packed_bytes += few.panels.numel() * few.panels.element_size()
        limit = KERNEL_ROWS * weight.shape[1]
        return lambda x: few(x) if x.numel() <= limit else many(x)

    def _project(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., heads, dim] and k, v [..., kv_heads, dim] of ``x`` [..., hidden], q and k rotated
        (``cos``/``sin`` broadcast over the heads axis)."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qkv = layer.qkv(layer.norm_in(x))
        qk = qkv[..., :(heads + kv_heads) * dim].unflatten(-1, (heads + kv_heads, dim))
        if layer.q_norm is not None:
            qk = torch.cat([layer.q_norm(qk[..., :heads, :]), layer.k_norm(qk[..., heads:, :])], dim=-2)
        half = dim // 2
        qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
        v = qkv[..., (heads + kv_heads) * dim:].unflatten(-1, (kv_heads, dim))
        return qk[..., :heads, :], qk[..., heads:, :], v

    @staticmethod
    def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(layer.norm_post(x)).chunk(2, dim=-1)
        return x + layer.down(layer.act(gate) * up)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache_layers: list[SlotLayer]) -> torch.Tensor:
        """Logits [rows, vocab] for ``ids`` [rows] at ``positions`` [rows]; ``mask`` [rows, cached + 1]
        (1 = attend) or None when no row is padded. Writes each layer's new key/value into its cache."""
        return self.step([(ids, positions, mask, cache_layers)])

    def step(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[SlotLayer]]]
             ) -> torch.Tensor:
        """One decode step of several batches, each ``(ids, positions, mask, cache_layers)`` as for
        :meth:`__call__`: the matrix products run once over all their rows (one pass over the weights),
        attention runs per batch over its own cache (so a batch of short rows does not attend over the
        padding a long one would force on it). Logits [all rows, vocab], in order."""
        dim, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        ids = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        positions = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        x = F.embedding(ids, self.embed)  # [rows, hidden]
        cos, sin = self.rotary(x[:, None], positions[:, None])  # [rows, 1, dim]: one per head below
        spans, row = [], 0
        for part_ids, _, mask, layers in parts:
            bias = None
            if mask is not None:  # additive, broadcast over [rows, kv_heads, group, keys]
                bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(mask == 0, float("-inf"))
                bias = bias[:, None, None, :]
            spans.append((row, row + part_ids.shape[0], bias, layers))
            row += part_ids.shape[0]
        for i, layer in enumerate(self.layers):
            q, k, v = self._project(layer, x, cos, sin)  # [rows, heads or kv_heads, dim]
            outs = []
            for lo, hi, bias, layers in spans:
                keys, values = layers[i].update(k[lo:hi, :, None], v[lo:hi, :, None])  # [rows, kv_heads, keys, dim]
                # Query head h reads key/value head h // group: group the queries instead of repeating keys.
                group = q[lo:hi].reshape(hi - lo, kv_heads, heads // kv_heads, dim) * layer.scaling
                scores = torch.matmul(group, keys.transpose(-1, -2))
                if bias is not None:
                    scores = scores + bias
                out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)
                outs.append(out.reshape(hi - lo, heads * dim))
            x = self._mlp(layer, x + layer.o(outs[0] if len(outs) == 1 else torch.cat(outs)))
        return self.lm_head(self.norm(x))

    def prefill(self, prompts: list[tuple[int, ...]] | list[list[int]], cache_layers: list[SlotLayer]
                ) -> torch.Tensor:
        """Logits [rows, vocab] at each prompt's last token, writing the prompts' keys/values into the
        empty cache layers (prompt ``i`` in row ``i``, right-aligned to the longest, zeros before it).

        The prompts run packed, one after the other in one sequence with no padding, so a group of
        short prompts reads the weights once and computes no padding; attention is causal within each
        prompt (block-diagonal across them). The last layer computes attention and MLP for each prompt's
        last token only: nothing else reads them.
        """
        device = self.embed.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width, rows = int(lengths.max()), len(prompts)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        segment = torch.repeat_interleave(torch.arange(rows, device=device), lengths)
        ends = lengths.cumsum(0)
        positions = torch.arange(len(ids), device=device) - (ends - lengths)[segment]
        index = (segment, positions + (width - lengths)[segment])  # cache (row, column) of each token
        last = ends - 1
        allowed = None  # one prompt: plain causal attention
        if rows > 1:
            allowed = (segment[:, None] == segment[None, :]).tril_()
        x = F.embedding(ids, self.embed)  # [tokens, hidden]
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # [tokens, 1, dim]
        final = len(self.layers) - 1
        for i, (layer, cache) in enumerate(zip(self.layers, cache_layers)):
            q, k, v = self._project(layer, x, cos, sin)  # [tokens, heads or kv_heads, dim]
            cache.fill(k, v, index, width)
            q, mask = q.transpose(0, 1)[None], allowed  # [1, heads, tokens, dim]
            if i == final:
                x, q = x[last], q[:, :, last]
                mask = None if allowed is None else allowed[last]
            out = F.scaled_dot_product_attention(
                q, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=None if mask is None else mask[None, None], is_causal=mask is None and i != final,
                scale=layer.scaling, enable_gqa=True)
            x = self._mlp(layer, x + layer.o(out[0].transpose(0, 1).reshape(x.shape[0], -1)))
        return self.lm_head(self.norm(x))


def text_stack(model: Any) -> tuple[Any, Any]:
    """``(decoder stack, its config)`` of a causal LM, or of a vision-language model's language model
    (``model.model.language_model`` / ``text_model``: LLaVA, Idefics3, SmolVLM...), whose decode step is
    the same as a text model's. AttributeError when ``model`` has neither."""
    base = model.model
    if not hasattr(base, "embed_tokens"):
        base = next((getattr(base, name) for name in ("language_model", "text_model") if hasattr(base, name)), None)
        if base is None:
            raise AttributeError("no decoder stack")
    return base, model.config.get_text_config()


def fast_decoder(model: Any, packed: bool = True, product_kernel: bool = True) -> FastDecoder | None:
    """A :class:`FastDecoder` for ``model``, or None when this step would not compute its forward (a
    family not in :data:`FAMILIES`, attention other than sdpa, quantized weights, sliding-window layers,
    partial rotary, modules that are not the plain ones)."""
    try:
        _, config = text_stack(model)
    except AttributeError:
        return None
    qk_norm = FAMILIES.get(getattr(config, "model_type", None))
    if qk_norm is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    # Quantized weights (bitsandbytes, torchao tensor subclasses, a pre-quantized checkpoint) are not
    # matrices this step can concatenate or pack: the model's own forward multiplies them.
    if getattr(model, "hf_quantizer", None) is not None or any(
            type(p.data) is not torch.Tensor for p in model.parameters()):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # e.g. Mistral: one sliding_window for every layer, when set
        full_attention = getattr(config, "sliding_window", None) is None
    else:
        full_attention = all(t == "full_attention" for t in layer_types)
    if not full_attention:
        return None
    try:
        return FastDecoder(model, qk_norm, packed, product_kernel)
    except (AttributeError, TypeError, KeyError):
        return None
