"""The demo vision-language checkpoints (demo:vlm, Qwen2-VL; demo:vlm-smol, Idefics3 / SmolVLM) build offline
and deterministically into ordinary checkpoints that the Auto classes load; their processors expand an image
into as many placeholder tokens as the model consumes; greedy generation depends on the image; the chat
templates accept string content, image and image_url parts, and (Qwen2-VL) render text as the demo ChatML."""

import hashlib
import time

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.models.demo import CHATML_TEMPLATE, DEMO_MODELS, build_tokenizer, demo_path
from deployments.models.processors import load_processor
from deployments.models.vlm_demo import VLM_DEMO, VLM_SMOL_DEMO

DEMOS = {"vlm": VLM_DEMO, "vlm-smol": VLM_SMOL_DEMO}
# Placeholder tokens per image: Qwen2-VL (H/28)*(W/28) within [min_pixels, max_pixels]; Idefics3 a fixed
# 16 per 64-pixel tile, 3x3 tiles plus the global view for any square image.
TOKENS = {"vlm": {448: 256, 64: 4}, "vlm-smol": {448: 160, 64: 160}}
CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each demo built once into a fresh directory: {name: (path, build seconds)}."""
    out = {}
    for name, builder in DEMOS.items():
        path = tmp_path_factory.mktemp(name)
        start = time.perf_counter()
        builder.build(path)
        out[name] = (path, time.perf_counter() - start)
    return out


@pytest.fixture(scope="module")
def loaded(built):
    """{name: (processor, model)} loaded with the Auto classes (load_processor: AutoProcessor where it can)."""
    from transformers import AutoModelForImageTextToText

    return {name: (load_processor(path), AutoModelForImageTextToText.from_pretrained(path).eval())
            for name, (path, _) in built.items()}


def image(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def prefill(processor, picture, conversation=CONVERSATION):
    prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return processor(text=prompt, images=[picture], return_tensors="pt")


def greedy(model, inputs, max_new_tokens=8) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_registered_as_demo_models():
    assert DEMO_MODELS["vlm"] is VLM_DEMO and DEMO_MODELS["vlm-smol"] is VLM_SMOL_DEMO


@pytest.mark.parametrize("name", DEMOS)
def test_auto_classes_load_the_checkpoint(built, name):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    path, seconds = built[name]
    assert seconds < 30
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == {"vlm": "qwen2_vl", "vlm-smol": "idefics3"}[name]
    assert config.text_config.max_position_embeddings >= 2048
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == {"vlm": "Qwen2VLForConditionalGeneration",
                                    "vlm-smol": "Idefics3ForConditionalGeneration"}[name]
    assert next(model.parameters()).dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = load_processor(path)
    assert type(processor).__name__ == {"vlm": "Qwen2VLProcessor", "vlm-smol": "Idefics3Processor"}[name]
    assert tokenizer.chat_template == processor.chat_template
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids({"vlm": "<|im_end|>", "vlm-smol": "<end_of_utterance>"}[name]) in eos
    if name == "vlm-smol" or is_torchvision_available():
        assert type(AutoProcessor.from_pretrained(path)).__name__ == type(processor).__name__
    else:  # transformers 5.x loads Qwen2-VL's video processor, which needs torchvision: why load_processor exists
        with pytest.raises(Exception):
            AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("name", DEMOS)
@pytest.mark.parametrize("size", [448, 64])
def test_image_placeholder_expands_to_what_the_model_consumes(loaded, name, size):
    processor, model = loaded[name]
    inputs = prefill(processor, image(size, seed=0))
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == TOKENS[name][size]
    if name == "vlm":
        assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
        merge = VLM_DEMO.merge_size ** 2
        assert int(inputs["image_grid_thw"].prod()) // merge == image_tokens
        assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod())
        # M-RoPE's 3-D positions need mm_token_type_ids at prefill: 1 exactly on the image tokens.
        assert int(inputs["mm_token_type_ids"].sum()) == image_tokens
    else:
        assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
        tiles = inputs["pixel_values"].shape[1]
        assert tiles * VLM_SMOL_DEMO.image_seq_len == image_tokens
        assert inputs["pixel_values"].shape[-2:] == (VLM_SMOL_DEMO.tile, VLM_SMOL_DEMO.tile)
    with torch.inference_mode():  # the model checks that its image features fill the placeholders exactly
        features = model.get_image_features(**{k: v for k, v in inputs.items() if k.startswith(("pixel", "image"))})
    pooled = getattr(features, "pooler_output", features)
    count = sum(f.shape[-2] if f.dim() == 3 else f.shape[0] for f in
                (pooled if isinstance(pooled, (list, tuple)) else [pooled]))
    assert count == image_tokens


@pytest.mark.parametrize("name", DEMOS)
def test_greedy_generation_depends_on_the_image(loaded, name):
    processor, model = loaded[name]
    first = greedy(model, prefill(processor, image(448, seed=1)))
    second = greedy(model, prefill(processor, image(448, seed=2)))
    assert len(first) == len(second) == 8
    assert first != second
    assert first == greedy(model, prefill(processor, image(448, seed=1)))  # and nothing else


@pytest.mark.parametrize("name", DEMOS)
def test_a_left_padded_batch_decodes_as_each_request_alone(loaded, name):
    processor, model = loaded[name]
    pictures = [image(448, seed=3), Image.fromarray(np.full((64, 96, 3), 200, dtype=np.uint8))]
    conversations = [CONVERSATION, [{"role": "user", "content": [
        {"type": "text", "text": "Tell me a story about this:"}, {"type": "image"}]}]]
    alone = [greedy(model, prefill(processor, p, c)) for p, c in zip(pictures, conversations)]
    prompts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        inputs = processor(text=prompts, images=pictures, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == alone


@pytest.mark.parametrize("name", DEMOS)
def test_templates_accept_string_content_and_image_urls(loaded, name):
    processor, _ = loaded[name]
    render = lambda conv: processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)  # noqa: E731
    url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}},
                                        {"type": "text", "text": "What is in this picture?"}]}]
    assert render(url) == render(CONVERSATION)
    text = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}])
    assert "Be brief." in text and "Hello!" in text
    image_block = {"vlm": "<|vision_start|><|image_pad|><|vision_end|>", "vlm-smol": "<image>"}[name]
    assert render(CONVERSATION).count(image_block) == 1


def test_qwen2_vl_template_renders_text_and_tools_as_the_demo_chatml(loaded):
    """Text-only conversations (tools, tool calls, tool results included) render exactly as demo:chat's."""
    processor, _ = loaded["vlm"]
    chat = build_tokenizer(VLM_DEMO.vocab_size)  # demo:chat's tokenizer, with CHATML_TEMPLATE
    assert chat.chat_template == CHATML_TEMPLATE
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "You add."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5."},
    ]
    for kwargs in ({"tools": tools}, {"tools": None}):
        want = chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        got = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **kwargs)
        assert got == want
    listed = [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]}]
    assert (processor.tokenizer.apply_chat_template(listed, tokenize=False)
            == processor.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                                       tokenize=False))


@pytest.mark.parametrize("name", DEMOS)
def test_builds_are_deterministic(built, tmp_path, name):
    DEMOS[name].build(tmp_path)
    first = built[name][0]
    for file in ["model.safetensors", "tokenizer.json", "processor_config.json", "config.json",
                 "chat_template.jinja", "generation_config.json"]:
        assert hashlib.sha256((tmp_path / file).read_bytes()).digest() == \
            hashlib.sha256((first / file).read_bytes()).digest(), file


def test_demo_path_builds_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_TRANSFORMERS_CACHE", str(tmp_path))
    path = demo_path("vlm-smol")
    assert path.is_relative_to(tmp_path) and (path / "config.json").exists()
    assert demo_path("vlm-smol") == path
