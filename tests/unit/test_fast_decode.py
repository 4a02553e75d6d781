"""The lean decode step computes exactly what the model's forward computes: bit-identical logits for
every family it claims, with and without padding, over many steps; anything else falls back to None."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from deployments.engines.batch import Batch
from deployments.engines.fast_decode import FAMILIES, fast_decoder

CPU = torch.device("cpu")


def tiny(config_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


FAMILY_MODELS = {
    "llama": lambda: tiny(LlamaConfig),
    "mistral": lambda: tiny(MistralConfig, sliding_window=None),
    "qwen2": lambda: tiny(Qwen2Config),
    "qwen3": lambda: tiny(Qwen3Config, head_dim=16),
}


def decode_steps(model, prompts, fast, steps=10):
    """Greedy decode ``steps`` tokens for ``prompts`` as one batch; every step's logits."""
    with torch.inference_mode():
        batch, logits = Batch.prefill(model, list(range(len(prompts))), prompts, 0, CPU)
        out = []
        for _ in range(steps):
            batch.set_next(logits.argmax(-1).tolist())
            logits = batch.decode(model, fast)
            out.append(logits.clone())
    return out


def test_every_family_is_tested():
    assert set(FAMILY_MODELS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9]], [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]],
                         ids=["one-row", "padded-rows"])
def test_logits_are_bit_identical_to_the_forward(family, prompts):
    model = FAMILY_MODELS[family]()
    fast = fast_decoder(model)
    assert fast is not None
    for plain, lean in zip(decode_steps(model, prompts, None), decode_steps(model, prompts, fast)):
        assert torch.equal(plain, lean)


def test_demo_chat_model_uses_it_with_identical_logits(demo_engine_factory):
    engine = demo_engine_factory()
    assert engine.fast_decoder is not None
    prompts = [[3, 4, 5, 6], [7, 8]]
    plain = decode_steps(engine.model, prompts, None, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(plain, decode_steps(engine.model, prompts,
                                                                      engine.fast_decoder, steps=20)))
    assert demo_engine_factory(fast_decode=False).fast_decoder is None


def test_other_models_fall_back_to_the_forward():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)).eval()
    assert fast_decoder(gpt2) is None
    eager = tiny(LlamaConfig, attn_implementation="eager")
    assert fast_decoder(eager) is None
    sliding = tiny(MistralConfig, sliding_window=8)
    assert fast_decoder(sliding) is None
