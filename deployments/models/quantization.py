"""Weight quantization of chat models: one table of methods, applied while a checkpoint loads.

``quantization:`` in a chat model's spec (app/config.py, which also holds the device each method runs on,
checked when the config is validated) names a row of :data:`METHODS`:

- ``none``: the dtype's float weights;
- ``int8``: CPU, int8 weight-only (each linear layer's weights as int8 with a per-channel scale,
  de-quantized inside the product), through torchao's ``quantize_`` after the float load
  (README: Quantized weights says why torchao, with figures);
- ``bnb-8bit`` / ``bnb-4bit``: CUDA, bitsandbytes LLM.int8() and 4-bit NF4 (compute in the model's dtype),
  through transformers' ``BitsAndBytesConfig`` as ``transformers serve --load_in_8bit/--load_in_4bit``.

Embeddings and the output head stay in float for every method (they are lookups and the head is tied to
the embedding in most small models). A checkpoint that is already quantized (its ``config.json`` has a
``quantization_config``: GPTQ, AWQ, bitsandbytes, compressed-tensors ...) loads through transformers as it
is, with ``none`` here. Quantized models run the transformers forward: the engine's fast decode path
(``fast_decode.py``) multiplies float weights only and steps aside for them.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


class QuantizationError(RuntimeError):
    """A method cannot be applied here (its library is missing); the message says what to install."""


def _bnb(bits: int) -> Callable[[torch.dtype], dict[str, Any]]:
    def kwargs(dtype: torch.dtype) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
        return {"quantization_config": config}
    return kwargs


def _torchao_int8(model: torch.nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # Only the transformer's linear layers: the (tied) output head keeps its float weights.
    head = model.get_output_embeddings()
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear) and module is not head)


def _no_kwargs(_dtype: torch.dtype) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """How one ``quantization:`` value loads a model."""

    library: str | None  # import name of the library it needs, checked before any weight is read
    install: str  # what to pip-install when it is missing
    weight_bytes: float | None  # bytes per element of a quantized linear weight (None: not quantized)
    load_kwargs: Callable[[torch.dtype], dict[str, Any]] = _no_kwargs  # extra from_pretrained arguments
    after_load: Callable[[torch.nn.Module], None] | None = None  # in-place quantization of the loaded model

    def check_installed(self, name: str) -> None:
        if self.library is not None and importlib.util.find_spec(self.library) is None:
            raise QuantizationError(f"quantization {name!r} needs {self.library}, which is not installed in "
                                    f"this environment: `pip install {self.install}`")


METHODS: dict[str, Method] = {
    "none": Method(library=None, install="", weight_bytes=None),
    "int8": Method(library="torchao", install="torchao", weight_bytes=1.0, after_load=_torchao_int8),
    # bitsandbytes keeps an fp32 scale per row (8-bit) or per 64-weight block (4-bit, ~0.56 bytes/weight).
    "bnb-8bit": Method(library="bitsandbytes", install="bitsandbytes", weight_bytes=1.0, load_kwargs=_bnb(8)),
    "bnb-4bit": Method(library="bitsandbytes", install="bitsandbytes", weight_bytes=0.5625, load_kwargs=_bnb(4)),
}


def prequantized(path: Path) -> str | None:
    """The quant_method a checkpoint's config.json declares (already quantized weights), else None."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else None


def quantized_weight_bytes(path: Path, method: str, target: torch.dtype) -> int | None:
    """Bytes the checkpoint's weights take once loaded with ``method`` (linear weights at the method's
    size, everything else at ``target``'s), read from the safetensors headers; None when the method does
    not quantize or the checkpoint has no safetensors files."""
    per_weight = METHODS[method].weight_bytes
    files = sorted(Path(path).glob("*.safetensors"))
    if per_weight is None or not files:
        return None
    from safetensors import safe_open

    total = 0.0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                numel = 1
                for n in shape:
                    numel *= n
                linear = len(shape) == 2 and not any(k in name for k in ("embed", "lm_head", "wte", "wpe"))
                total += numel * (per_weight if linear else target.itemsize)
    return int(total)
