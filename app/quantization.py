"""The ``quantization:`` field of chat model specs: its values, the device each runs on, and the check that
refuses a method on a device it cannot run on (torch-free, so ``python -m app.check`` and the ingress can
use it; the methods themselves are ``deployments/models/quantization.py``)."""

from __future__ import annotations

from typing import Literal

# Weight quantization methods: the keys of deployments/models/quantization.METHODS (a unit test keeps them
# equal), and the one device each method runs on ("none" runs on any).
Quantization = Literal["none", "int8", "bnb-8bit", "bnb-4bit"]
QUANTIZATION_DEVICE: dict[str, str] = {"int8": "cpu", "bnb-8bit": "cuda", "bnb-4bit": "cuda"}
QUANTIZATION_DOC = (
    "Quantize the weights as they load (README: Quantized weights): `none` (default) = the dtype's "
    "float weights; `int8` = CPU int8 weight-only (torchao); `bnb-8bit` / `bnb-4bit` = bitsandbytes "
    "LLM.int8() / 4-bit NF4 on CUDA (needs `pip install bitsandbytes`). A method runs on one device, which "
    "`device` must name (int8: cpu; bnb-*: cuda). A checkpoint whose config.json has a "
    "`quantization_config` is already quantized and loads as it is, with `none` here. Quantized models "
    "decode with the transformers forward (the engine's fast path is for float weights).")


def check_quantization(method: str, device: str, dtype: str) -> None:
    """Refuse a quantization method that cannot run on the model's device (at config validation, i.e. when
    the app is built and in ``python -m app.check``, not in a replica). ``device: auto`` is refused too:
    the GPU a replica gets is only known from its ray_actor_options, so the device must be named."""
    needs = QUANTIZATION_DEVICE.get(method)
    if needs is not None and device != needs:
        why = ", which picks cuda only when the replica gets a GPU" if device == "auto" else ""
        raise ValueError(f"quantization {method!r} runs on {needs} only: set `device: {needs}` (it is "
                         f"{device!r}{why})")
    if method == "int8" and dtype not in ("auto", "float32"):
        raise ValueError(f"quantization 'int8' quantizes float32 weights; dtype {dtype!r} cannot be combined "
                         "with it (leave dtype: auto)")
