"""The lean prefill and decode step compute what the model's forward computes: logits equal up to float
rounding and the same greedy tokens, for every family it claims, with and without padding, over many
steps, and the same keys/values in the cache; the model's own forward is unchanged by it; anything else
falls back to None."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from deployments.engines.batch import Batch
from deployments.engines.fast_decode import FAMILIES, fast_decoder, text_stack

CPU = torch.device("cpu")


def tiny(config_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_vl(family: str):
    """A vision-language model of ``family`` (Qwen2-VL, Qwen2.5-VL) whose language model is :func:`tiny`'s
    size: the lean step computes its text decode (multimodal RoPE with every component equal)."""
    import transformers

    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[family]
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=64, out_hidden_size=64, embed_dim=32, num_heads=2, intermediate_size=64)
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision)
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()


FAMILY_MODELS = {
    "llama": lambda: tiny(LlamaConfig),
    "mistral": lambda: tiny(MistralConfig, sliding_window=None),
    "qwen2": lambda: tiny(Qwen2Config),
    "qwen3": lambda: tiny(Qwen3Config, head_dim=16),
    "qwen2_vl_text": lambda: tiny_vl("qwen2_vl"),
    "qwen2_5_vl_text": lambda: tiny_vl("qwen2_5_vl"),
}


def decode_steps(model, prompts, fast, steps=10):
    """Greedy decode ``steps`` tokens for ``prompts`` as one batch (prefill and steps through ``fast``
    when given); the prefill's logits, then every step's."""
    with torch.inference_mode():
        batch, logits = Batch.prefill(model, list(range(len(prompts))), prompts, 0, CPU, fast)
        out = [logits.clone()]
        for _ in range(steps):
            batch.set_next(logits.argmax(-1).tolist())
            logits = batch.decode(model, fast)
            out.append(logits.clone())
    return out


def assert_same_decoding(plain, lean):
    """Every step's logits within float rounding of the forward's, and the same greedy tokens."""
    assert len(plain) == len(lean)
    for step, (a, b) in enumerate(zip(plain, lean)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}: greedy tokens differ"


def test_every_family_is_tested():
    assert set(FAMILY_MODELS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9]], [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]],
                         ids=["one-row", "padded-rows"])
def test_logits_match_the_forward(family, prompts):
    model = FAMILY_MODELS[family]()
    before = decode_steps(model, prompts, None)
    fast = fast_decoder(model)
    assert fast is not None
    after = decode_steps(model, prompts, None)  # the stacked weights leave the forward as it was
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert_same_decoding(before, decode_steps(model, prompts, fast))


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_prefill_caches_the_forwards_keys_and_values(family):
    """Real positions hold the forward's keys/values; padding positions hold finite values (a NaN there
    would poison every later step, even though the mask gives it zero weight)."""
    model = FAMILY_MODELS[family]()
    fast = fast_decoder(model)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    with torch.inference_mode():
        plain, _ = Batch.prefill(model, [0, 1, 2], prompts, 0, CPU)
        lean, _ = Batch.prefill(model, [0, 1, 2], prompts, 0, CPU, fast)
    real = plain.mask.bool()[:, None, :, None]
    for a, b in zip(plain.layers, lean.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y * real, x * real, rtol=1e-5, atol=1e-5)


def forced_steps(model, prompts, fast, tokens):
    """Each step's logits (as float32) when the batch is fed ``tokens`` (teacher forcing)."""
    with torch.inference_mode():
        batch, logits = Batch.prefill(model, list(range(len(prompts))), prompts, 0, CPU, fast)
        out = [logits.float()]
        for step in tokens:
            batch.set_next(step)
            out.append(batch.decode(model, fast).float())
    return out


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_in_bfloat16_it_is_as_close_to_float32_as_the_forward(family):
    """In bf16, greedy text can differ from the forward's at near-ties, as it can between two bf16 kernels:
    what must hold is that the lean step loses no more precision than the forward does."""
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    tokens = [[11 + 3 * i, 12 + 3 * i, 13 + 3 * i] for i in range(6)]
    exact = forced_steps(FAMILY_MODELS[family](), prompts, None, tokens)
    model = FAMILY_MODELS[family]().to(torch.bfloat16)
    plain = forced_steps(model, prompts, None, tokens)
    lean = forced_steps(model, prompts, fast_decoder(model), tokens)
    for e, p, q in zip(exact, plain, lean):
        assert (q - e).abs().max() <= 2 * (p - e).abs().max() + 1e-3


def test_stacked_projections_share_the_models_storage():
    model = FAMILY_MODELS["qwen2"]()
    attn = model.model.layers[0].self_attn
    fast_decoder(model, packed=False)
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    assert q.weight.untyped_storage().data_ptr() == v.weight.untyped_storage().data_ptr()
    assert k.weight.data_ptr() == q.weight.data_ptr() + q.weight.numel() * q.weight.element_size()
    assert v.bias.data_ptr() == k.bias.data_ptr() + k.bias.numel() * k.bias.element_size()
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()  # the forward reads the stacked copy


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_weights_compute_the_same_products(family):
    """float32 on a CPU multiplies by oneDNN-packed copies; the products equal F.linear's up to rounding
    and are counted as extra memory. bf16, or packed=False, keeps the model's own weights."""
    model = FAMILY_MODELS[family]()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    plain, packed = fast_decoder(model, packed=False), fast_decoder(model, product_kernel=False)
    assert packed.packed and not plain.packed and plain.packed_bytes == 0
    text = [*text_stack(model)[0].modules(), model.lm_head]  # a VLM's vision tower is not the step's
    linear = sum(m.weight.numel() * 4 for m in text if isinstance(m, torch.nn.Linear))
    assert packed.packed_bytes == linear
    for a, b in zip(decode_steps(model, prompts, plain), decode_steps(model, prompts, packed)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not fast_decoder(FAMILY_MODELS[family]().to(torch.bfloat16)).packed


def test_demo_chat_model_uses_it_with_the_same_tokens(demo_engine_factory):
    engine = demo_engine_factory()
    assert engine.fast_decoder is not None
    prompts = [[3, 4, 5, 6], [7, 8]]
    assert_same_decoding(decode_steps(engine.model, prompts, None, steps=20),
                         decode_steps(engine.model, prompts, engine.fast_decoder, steps=20))
    assert demo_engine_factory(fast_decode=False).fast_decoder is None


def test_other_models_fall_back_to_the_forward():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)).eval()
    assert fast_decoder(gpt2) is None
    eager = tiny(LlamaConfig, attn_implementation="eager")
    assert fast_decoder(eager) is None
    sliding = tiny(MistralConfig, sliding_window=8)
    assert fast_decoder(sliding) is None


def test_quantized_weights_fall_back_to_the_forward_with_the_forwards_tokens():
    """int8 weights (torchao tensor subclasses): the lean step steps aside, and decoding through the model's
    forward runs as before (the engine passes no decoder)."""
    from deployments.models.quantization import METHODS

    model = tiny(LlamaConfig)
    METHODS["int8"].after_load(model)
    assert fast_decoder(model) is None
    steps = decode_steps(model, [[1, 2, 3], [4, 5]], None, steps=3)
    assert all(torch.isfinite(s).all() for s in steps)
