"""Vision-language models in the generation engine, no Ray, no HTTP (deployments/engines/vision.py, chat_params,
generation, batch, plain_batch, tokenize), on both demo families (demo:vlm = Qwen2-VL with multimodal RoPE,
demo:vlm-smol = Idefics3 / SmolVLM with fixed tiles):

- with_images refuses, naming the part at fault: a text-only model, too many images, an image the
  processor refuses; a context-length error says how many prompt tokens the images take;
- the engine's greedy tokens equal ``model.generate`` on the processor's inputs, alone, batched with text
  rows, with ``n`` choices, joining a running batch, and through PlainBatch; each image is encoded once;
- /tokenize renders a VLM's messages as content parts, as generation does.
"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import ChatModelSpec, GenerationLimits
from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol.chat import ChatCompletionRequest
from app.protocol.tokenize import TokenizeRequest
from deployments.engines.chat_params import to_generation_request
from deployments.engines.generation import GenerationEngine
from deployments.engines.plain_batch import PlainBatch
from deployments.engines.tokenize import run_tokenizer
from deployments.engines.vision import with_images
from deployments.models.vlm_demo import VLM_DEMO, VLM_SMOL_DEMO
from tests.unit.conftest import collect

DEMOS = {"vlm": VLM_DEMO, "vlm-smol": VLM_SMOL_DEMO}
LIMITS = GenerationLimits()
MAX_TOKENS = 10


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


# Each conversation's user content: text, or an image (lossless PNG: the engine decodes what the oracle sees).
A, B, C = picture(96, 64, 1), picture(56, 112, 2), picture(64, 64, 3)
PROMPTS = [
    ["What is in this picture?", A],
    [B, "Describe it."],
    ["Tell me a story about a robot."],
    ["Compare", A, "with", C],
]


def wire_part(part):
    if isinstance(part, str):
        return {"type": "text", "text": part}
    url = "data:image/png;base64," + base64.b64encode(png(part)).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def chat(content, **extra) -> ChatCompletionRequest:
    """A greedy chat request with logprobs (so every token, even one with empty text, is in a delta)."""
    body = {"model": "m", "messages": [{"role": "user", "content": [wire_part(p) for p in content]}],
            "temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": 0, **extra}
    return ChatCompletionRequest.model_validate(body)


def tokens(deltas, index=0) -> list[int]:
    assert not isinstance(deltas, Exception), deltas
    return [t for d in deltas if d.index == index for t in d.token_ids]


def tower(model):
    """The vision encoder: Qwen2-VL's ``visual``, Idefics3's ``vision_model``."""
    return getattr(model.model, "visual", None) or model.model.vision_model


class TowerCalls:
    """Counts the vision encoder's forward calls, and how many rows were running at each (model thread)."""

    def __init__(self, engine) -> None:
        self.running: list[int] = []
        self._handle = tower(engine.model).register_forward_pre_hook(
            lambda *_: self.running.append(engine.running_rows))

    def __len__(self) -> int:
        return len(self.running)

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Each demo built once into a fresh directory and loaded by the chat loader: {name: engine}."""
    from deployments.models.loader import load_chat_engine

    out = {}
    for name, builder in DEMOS.items():
        path = tmp_path_factory.mktemp(name)
        builder.build(path)
        out[name] = load_chat_engine(ChatModelSpec(id=name, source=str(path)))
    yield out
    for engine in out.values():
        engine.close()


@pytest.fixture(scope="module")
def expected(loaded):
    """{name: [greedy tokens of model.generate for each of PROMPTS]}, the processor preparing the inputs."""
    out = {}
    for name, engine in loaded.items():
        processor, model = engine.processor, engine.model
        out[name] = []
        for content in PROMPTS:
            parts = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in content]
            text = processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                 add_generation_prompt=True)
            images = [p for p in content if not isinstance(p, str)] or None
            inputs = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                generated = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
            out[name].append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return out


@pytest.fixture
def make(loaded):
    """A fresh engine over a loaded demo's model (engines hold per-event-loop state); closed after the test."""
    made = []

    def build(name, plain=False, **kwargs):
        base = loaded[name]
        engine = GenerationEngine(base.model, base.tokenizer, device=base.device, eos_token_ids=base.eos_token_ids,
                                  pad_token_id=base.pad_token_id, processor=base.processor,
                                  context_len=kwargs.pop("context_len", base.context_len), **kwargs)
        if plain:  # as a model whose cache cannot concatenate (sliding-window layers) is served
            engine.can_concatenate, engine._batch_class, engine.fast_decoder = False, PlainBatch, None
        made.append(engine)
        return engine

    yield build
    for engine in made:
        engine.close()


def prepared(engine, content, **extra):
    return to_generation_request(chat(content, **extra), engine, LIMITS)


# --- with_images: refusals name the part ---------------------------------------------------------------

def test_a_text_only_model_refuses_images_naming_the_first_image(demo_engine_factory):
    engine = demo_engine_factory()
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": [wire_part("look"), wire_part(A), wire_part(B)]}]})
    with pytest.raises(InvalidRequest) as caught:
        to_generation_request(request, engine, LIMITS)
    assert caught.value.code == "images_not_supported" and caught.value.param == "messages[2].content[1]"
    assert caught.value.message.startswith("messages[2].content[1]")
    # Text alone is served: the refusal is about the images only.
    to_generation_request(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hello"}]}), engine, LIMITS)


@pytest.mark.parametrize("name", DEMOS)
def test_too_many_images_names_the_first_one_past_the_limit(loaded, name):
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [wire_part(A), wire_part("and"), wire_part(B)]},
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": [wire_part("and this"), wire_part(C)]}]})
    limits = GenerationLimits(max_images_per_request=2)
    with pytest.raises(InvalidRequest) as caught:
        to_generation_request(request, loaded[name], limits)
    assert caught.value.code == "too_many_images" and caught.value.param == "messages[2].content[1]"
    assert "at most 2" in caught.value.message
    at_limit = GenerationLimits(max_images_per_request=3)
    assert to_generation_request(request, loaded[name], at_limit).images is not None


def test_an_image_the_processor_refuses_is_named_in_second_position(loaded):
    """Qwen2-VL's image processor refuses an aspect ratio over 200 (1x4000): the error names that part, not
    the first image, and is an InvalidRequest (not a 500)."""
    request = chat(["first", A, "second", Image.new("RGB", (1, 4000), (9, 9, 9))])
    with pytest.raises(InvalidRequest) as caught:
        to_generation_request(request, loaded["vlm"], LIMITS)
    assert caught.value.code == "invalid_image" and caught.value.param == "messages[0].content[3]"
    assert "cannot be prepared" in caught.value.message


@pytest.mark.parametrize("name", DEMOS)
def test_an_undecodable_image_in_second_position_is_named(loaded, name):
    request = chat([A, "then"])
    request.messages[0].content.append(request.messages[0].content[0].model_copy(deep=True))
    request.messages[0].content[2].image_url.set_data(b"GIF89a broken")
    images = request.images()
    assert [where for where, _ in images] == ["messages[0].content[0]", "messages[0].content[2]"]
    with pytest.raises(InvalidRequest) as caught:
        with_images(loaded[name], "text", images, LIMITS)
    assert caught.value.code == "invalid_image" and caught.value.param == "messages[0].content[2]"


# Image tokens per 64x64 image (tests/unit/test_vlm_demo.py): Qwen2-VL (64/28 -> 2)^2 = 4 merged patches;
# Idefics3 3x3 tiles plus the global view, 16 tokens each.
IMAGE_TOKENS_64 = {"vlm": 4, "vlm-smol": 160}


@pytest.mark.parametrize("name", DEMOS)
def test_context_length_errors_say_how_many_tokens_the_images_take(make, name):
    tokens_each = IMAGE_TOKENS_64[name]
    content = ["Compare", C, "with", picture(64, 64, 4)]
    prompt_len = len(prepared(make(name), content).prompt_ids)
    note = f"({2 * tokens_each} of them for 2 images)"
    small = make(name, context_len=prompt_len)  # no room for a completion
    with pytest.raises(ContextLengthExceeded) as caught:
        prepared(small, content)
    assert f"use {prompt_len} tokens {note}" in caught.value.message and caught.value.param == "messages"
    roomy = make(name, context_len=prompt_len + 5)
    with pytest.raises(ContextLengthExceeded) as caught:
        prepared(roomy, content, max_tokens=6)
    assert f"({prompt_len} in the messages {note}, 6 in the completion)" in caught.value.message
    with pytest.raises(ContextLengthExceeded) as caught:
        prepared(make(name, context_len=tokens_each), ["one", C])
    assert f"({tokens_each} of them for 1 image)" in caught.value.message


# --- the engine: equal to model.generate, each image encoded once ---------------------------------------

@pytest.mark.parametrize("name", DEMOS)
async def test_greedy_output_equals_model_generate(make, expected, name):
    engine = make(name)
    calls = TowerCalls(engine)
    try:
        for content, want in zip(PROMPTS, expected[name]):
            assert len(want) == MAX_TOKENS
            out = (await collect(engine, [prepared(engine, content)]))[0]
            assert tokens(out) == want, content
            assert out[-1].completion_tokens == MAX_TOKENS
    finally:
        calls.remove()
    assert len(calls) == sum(any(not isinstance(p, str) for p in c) for c in PROMPTS)  # one per image request


@pytest.mark.parametrize("fast", [True, False], ids=["lean-decode", "transformers-forward"])
@pytest.mark.parametrize("name", DEMOS)
async def test_rows_with_and_without_images_together_equal_each_alone(make, expected, name, fast):
    engine = make(name, fast_decode=fast)
    assert (engine.fast_decoder is not None) == fast  # text prefill and every decode step: both paths
    calls = TowerCalls(engine)
    try:
        together = await collect(engine, [prepared(engine, c) for c in PROMPTS])
    finally:
        calls.remove()
    assert [tokens(out) for out in together] == expected[name]
    assert len(calls) == 3


@pytest.mark.parametrize("name", DEMOS)
async def test_n_choices_share_one_image_encoding(make, expected, name):
    engine = make(name)
    calls = TowerCalls(engine)
    try:
        out = (await collect(engine, [prepared(engine, PROMPTS[0], n=3)]))[0]
    finally:
        calls.remove()
    assert [tokens(out, i) for i in range(3)] == [expected[name][0]] * 3
    assert sorted(d.index for d in out if d.finish_reason) == [0, 1, 2]
    assert len(calls) == 1


@pytest.mark.parametrize("name", DEMOS)
async def test_an_image_request_joining_a_running_one_does_not_recompute_its_image(make, name):
    engine = make(name)
    first = lambda: prepared(engine, PROMPTS[0], max_tokens=60, ignore_eos=True)  # noqa: E731
    second = lambda: prepared(engine, PROMPTS[1])  # noqa: E731
    alone = [tokens((await collect(engine, [make_request()]))[0]) for make_request in (first, second)]
    long, short = first(), second()  # prepared before: the join must not wait for the processor
    calls = TowerCalls(engine)
    try:
        running = engine.submit([long])[0]
        head = await running.__anext__()  # the first request is decoding now
        joined = asyncio.create_task(collect(engine, [short]))
        rest = [d async for items in running for d in items]
        late = (await joined)[0]
    finally:
        calls.remove()
    assert tokens([*head, *rest]) == alone[0] and len(alone[0]) == 60
    assert tokens(late) == alone[1]
    assert len(calls) == 2  # one encoding per image request, none repeated when the second joined
    assert calls.running == [0, 1]  # the second image was encoded while the first request's row ran


@pytest.mark.parametrize("name", DEMOS)
async def test_plain_batch_path_equals_the_batch_path(make, expected, name):
    """A model whose cache cannot concatenate: submit() splits a mixed group into the text rows and one
    group per image request; outputs equal the Batch path's (and model.generate's)."""
    requests = lambda engine: [*(prepared(engine, c) for c in PROMPTS), prepared(engine, PROMPTS[3], n=2)]  # noqa: E731
    batch_engine = make(name)
    via_batch = await collect(batch_engine, requests(batch_engine))
    plain = make(name, plain=True)
    assert plain._batch_class is PlainBatch and not plain.can_concatenate
    calls = TowerCalls(plain)
    try:
        via_plain = await collect(plain, requests(plain))
    finally:
        calls.remove()
    want = [*expected[name], expected[name][3], expected[name][3]]
    got_batch = [tokens(out) for out in via_batch] + [tokens(via_batch[-1], 1)]
    got_plain = [tokens(out) for out in via_plain] + [tokens(via_plain[-1], 1)]
    assert got_plain == got_batch == want
    assert len(calls) == 4  # the n=2 request's image once


# --- /tokenize on a VLM ---------------------------------------------------------------------------------

# SmolVLM's own template: it iterates the content as parts, so string content renders as nothing at all.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.mark.parametrize("name", DEMOS)
def test_tokenize_renders_string_content_as_parts(loaded, name):
    from transformers import AutoTokenizer

    engine = loaded[name]
    tokenizer = AutoTokenizer.from_pretrained(engine.tokenizer.name_or_path)
    tokenizer.chat_template = SMOLVLM_TEMPLATE
    request = TokenizeRequest(model="m", messages=[{"role": "user", "content": "Hello there, robot"}],
                              return_token_strs=True)
    result = run_tokenizer(request, engine, LIMITS, tokenizer)
    assert tokenizer.decode(result.tokens) == "<|im_start|>User: Hello there, robot<end_of_utterance>\nAssistant:"
    assert result.max_model_len == engine.context_len and len(result.token_strs) == len(result.tokens)
    # The engine's own template: the same ids generation's prompt has.
    ids = run_tokenizer(request, engine, LIMITS).tokens
    chat_request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Hello there, robot"}]})
    assert ids == to_generation_request(chat_request, engine, LIMITS).prompt_ids


@pytest.mark.parametrize("name", DEMOS)
def test_tokenize_counts_image_tokens_as_generation_does(loaded, name):
    engine = loaded[name]
    messages = chat(["What is this?", C]).model_dump(exclude_none=True)["messages"]
    count = len(run_tokenizer(TokenizeRequest(model="m", messages=messages), engine, LIMITS).tokens)
    assert count == len(prepared(engine, ["What is this?", C]).prompt_ids)
