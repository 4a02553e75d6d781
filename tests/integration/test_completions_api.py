"""``/v1/completions`` over real HTTP and the official `openai` SDK against the session's Ray Serve: the
same engine and batching as chat, prompts tokenized as they are, choices numbered across prompts."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import requests

from tests.openapi_schema import assert_valid

MODEL = "demo-chat"
PROMPTS = ["Paris is the capital of", "one two three", "tell me a story about a robot", "x"]


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.models.demo import demo_path

    path = demo_path("chat")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def test_body_validates_and_max_tokens_defaults_to_16(server):
    r = requests.post(f"{server}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": PROMPTS[0], "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_server_equals_direct_transformers_generate(client, demo):
    import torch

    tok, model = demo
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    direct = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    served = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert served.choices[0].text == direct


def test_a_rendered_chat_prompt_completes_as_chat_does(client, demo):
    """One generation path: the chat template's text as a completions prompt gives chat's answer."""
    tok, _ = demo
    messages = [{"role": "user", "content": PROMPTS[2]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    completion = client.completions.create(model=MODEL, prompt=text, max_tokens=20, temperature=0,
                                           extra_body={"add_special_tokens": False})
    assert completion.choices[0].text == chat.choices[0].message.content
    assert completion.usage.prompt_tokens == chat.usage.prompt_tokens


def test_prompt_lists_number_choices_across_prompts(client, demo):
    tok, _ = demo
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in PROMPTS[:3]]
    many = client.completions.create(model=MODEL, prompt=PROMPTS[:3], n=2, max_tokens=8, temperature=0)
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices] == [a for a in alone for _ in range(2)]
    ids = client.completions.create(model=MODEL, prompt=[tok(p)["input_ids"] for p in PROMPTS[:3]],
                                    max_tokens=8, temperature=0)
    assert [c.text for c in ids.choices] == alone
    assert many.usage.prompt_tokens == ids.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in PROMPTS[:3])
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[:2], echo=True, max_tokens=8, temperature=0)
    assert [c.text for c in echoed.choices] == [PROMPTS[0] + alone[0], PROMPTS[1] + alone[1]]
    echoed_ids = client.completions.create(model=MODEL, prompt=tok(PROMPTS[1])["input_ids"], echo=True,
                                           max_tokens=8, temperature=0)
    assert echoed_ids.choices[0].text == PROMPTS[1] + alone[1]


def test_stream_equals_non_stream_with_usage_and_done(server, client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=12, temperature=0.8, seed=5)
    whole = client.completions.create(**kwargs)
    with requests.post(f"{server}/v1/completions", stream=True, timeout=60,
                       json={**kwargs, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    texts: dict[int, str] = {}
    for event in events:
        # OpenAI streams the response's own shape, with finish_reason null until a choice ends.
        filled = {**event, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in event["choices"]]}
        assert_valid(filled, "CreateCompletionResponse")
        for c in event["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert all("usage" not in e for e in events[:-1])


async def test_batched_equals_alone_and_beside_chat(async_client):
    async def complete(prompt):
        r = await async_client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        return r.choices[0].text

    async def chat(prompt):
        return await async_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                          max_tokens=16, temperature=0)

    alone = [await complete(p) for p in PROMPTS]
    together = await asyncio.gather(*(complete(p) for p in PROMPTS), *(chat(p) for p in PROMPTS))
    assert list(together[:len(PROMPTS)]) == alone


@pytest.mark.parametrize("body, param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt[1]"),  # a token-id list (by its first item) with a string at 1
    ({"prompt": [10**7]}, "prompt"),
    ({"prompt": "word " * 1200}, "prompt"),
    ({"prompt": "word " * 250, "max_tokens": 300}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 513}, "max_tokens"),
    ({"prompt": "x" * 10**6}, "prompt"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "logprobs": 2, "echo": True}, "echo"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "hi", "n": 0}, "n"),
])
def test_bad_requests_are_openai_400s(server, body, param):
    r = requests.post(f"{server}/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param


def test_other_models_and_the_sdk_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="demo-whisper", prompt="hi")
    assert info.value.body["code"] == "model_task_mismatch"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", suffix="x")
