"""The chat API over real HTTP and the official `openai` SDK against one real local Ray Serve."""

import asyncio
import json

import openai
import pytest
import requests

from tests.openapi_schema import assert_valid

MODEL = "demo-chat"
PROMPTS = ["hi", "tell me a story about a robot who counts to ten", "one two", "Paris is the capital of",
           "aaa", "What can I help you with? " * 6, "x", "def add(a, b):\n    return a + b"]


def msgs(text):
    return [{"role": "user", "content": text}]


def sse_events(response):
    """Parse a raw SSE body into JSON events, checking the framing; returns (events, saw_done)."""
    events, done = [], False
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        events.append(json.loads(data))
    return events, done


def test_models_list_and_health(server, client):
    body = requests.get(f"{server}/v1/models", timeout=30).json()
    assert_valid(body, "ListModelsResponse")
    assert MODEL in [m.id for m in client.models.list().data]
    assert client.models.retrieve(MODEL).id == MODEL
    assert requests.get(f"{server}/health", timeout=30).status_code == 200


def test_the_readme_sdk_call(client):
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(model=model, messages=msgs("hi"))
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_non_streamed_response_validates(server):
    r = requests.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                     {"role": "assistant", "content": "hello"},
                                     {"role": "user", "content": "again"}],
        "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 12


def test_stream_framing_and_schema(server):
    with requests.post(f"{server}/v1/chat/completions", stream=True, timeout=60, json={
            "model": MODEL, "messages": msgs("hi"), "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, done = sse_events(r)
    assert done
    for event in events:
        assert_valid(event, "CreateChatCompletionStreamResponse")
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert all(e["usage"] is None for e in events[:-1])
    assert len({e["id"] for e in events}) == 1


def test_stream_equals_non_stream_and_sdk(client):
    kwargs = dict(model=MODEL, messages=msgs(PROMPTS[1]), max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    parts = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert streamed == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert not any(getattr(p, "usage", None) for p in parts)  # usage only when asked for


def test_server_output_equals_direct_transformers_generate(client):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.models.demo import demo_path

    path = demo_path("chat")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    text = tok.apply_chat_template(msgs(PROMPTS[3]), tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)
    direct = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    served = client.chat.completions.create(model=MODEL, messages=msgs(PROMPTS[3]), max_tokens=16,
                                            temperature=0)
    assert served.choices[0].message.content == direct


async def test_batched_equals_unbatched_over_http(async_client):
    async def ask(prompt):
        r = await async_client.chat.completions.create(model=MODEL, messages=msgs(prompt),
                                                       max_tokens=24, temperature=0)
        return r.choices[0].message.content

    alone = [await ask(p) for p in PROMPTS]
    together = await asyncio.gather(*(ask(p) for p in PROMPTS))
    assert list(together) == alone


async def test_seed_reproducible_with_different_neighbours(async_client):
    async def ask(prompt, **kw):
        r = await async_client.chat.completions.create(model=MODEL, messages=msgs(prompt),
                                                       max_tokens=20, **kw)
        return r.choices[0].message.content

    seeded = dict(temperature=1.0, top_p=0.95, seed=42)
    alone = await ask("tell me a story", **seeded)
    crowd = await asyncio.gather(ask("tell me a story", **seeded),
                                 *(ask(p, temperature=1.2) for p in PROMPTS[:5]))
    assert crowd[0] == alone
    assert await ask("tell me a story", temperature=1.0, top_p=0.95, seed=43) != alone


def test_stop_sequence_and_n_choices(client):
    kwargs = dict(model=MODEL, messages=msgs(PROMPTS[1]), max_tokens=30, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.chat.completions.create(stop=[stop, "\u2603never"], **kwargs)
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=8, n=3,
                                          temperature=1.0, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    # usage counts every choice's tokens: 8 for each choice cut by length, at most 8 for the others.
    cut_by_length = sum(c.finish_reason == "length" for c in many.choices)
    assert 8 * cut_by_length <= many.usage.completion_tokens <= 8 * 3
    single = client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=1)
    assert many.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once, not n times


def test_streamed_n_choices_each_finish(client):
    parts = list(client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=6, n=2,
                                                temperature=0.8, stream=True))
    finished = {c.index for p in parts for c in p.choices if c.finish_reason}
    assert finished == {0, 1}


def test_penalties_and_top_k_are_accepted_and_change_sampling(client):
    base = dict(model=MODEL, messages=msgs("hi"), max_tokens=24, temperature=0)
    plain = client.chat.completions.create(**base).choices[0].message.content
    penalised = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **base)
    assert penalised.choices[0].message.content != plain
    topk = client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=8, seed=1,
                                          temperature=1.0, extra_body={"top_k": 1})
    assert topk.choices[0].message.content == client.chat.completions.create(
        **{**base, "max_tokens": 8}).choices[0].message.content  # top_k=1 is greedy


def test_errors_are_openai_shaped(server, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=msgs("hi"))
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=msgs("hi"), temperature=7)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=MODEL, messages=msgs("hi " * 1100), max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded" and "1024" in long.value.body["message"]
    for resp in [requests.post(f"{server}/v1/chat/completions", data="{nope", timeout=30,
                               headers={"content-type": "application/json"}),
                 requests.post(f"{server}/v1/chat/completions", timeout=30, json={
                     "model": MODEL, "messages": msgs("x " * 2000), "stream": True}),
                 requests.get(f"{server}/v1/chat/completions", timeout=30),
                 requests.get(f"{server}/v1/nothing", timeout=30)]:
        assert resp.status_code in (400, 404, 405), resp.text
        assert_valid(resp.json(), "ErrorResponse")


def test_reconfigure_changes_batching_of_the_live_replica(client):
    from ray import serve

    handle = serve.get_deployment_handle(MODEL, app_name="openai")
    before = handle.stats.remote().result()
    try:
        handle.reconfigure.remote({"max_batch_size": 4, "batch_wait_timeout_s": 0.01}).result()
        after = handle.stats.remote().result()
        assert after["batching"]["max_batch_size"] == 4
        assert after["batching"]["batch_wait_timeout_s"] == 0.01
        assert after["tokens_generated"] >= before["tokens_generated"]  # same replica, no restart
        reply = client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
        # Above max_ongoing_requests (16 in the test deployment): refused, and the replica keeps serving
        # with the settings it had (Ray would replace a replica whose reconfigure raised).
        handle.reconfigure.remote({"max_batch_size": 17}).result()
        refused = handle.stats.remote().result()
        assert "max_ongoing_requests" in refused["config_error"]
        assert refused["batching"]["max_batch_size"] == 4
        assert refused["tokens_generated"] >= after["tokens_generated"]  # the same replica
        reply = client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        handle.reconfigure.remote(before["batching"]).result()
    assert handle.stats.remote().result()["batching"] == before["batching"]
