"""Agents' features through real HTTP and the `openai` SDK on the session's Ray Serve: logprobs equal a
direct forward pass, structured output always parses under its schema (sampled, in shared batches, beside
free rows that stay token for token what they are alone), and required tool calls come back parsed."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Literal

import jsonschema
import pytest
import requests
from pydantic import BaseModel, Field

from tests.openapi_schema import assert_valid

MODEL = "demo-chat"
ASK = [{"role": "user", "content": "tell me about a person"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 8}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.models.demo import demo_path

    path = demo_path("chat")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def post(server, route, **body):
    return requests.post(f"{server}{route}", timeout=120, json={"model": MODEL, **body})


# --- logprobs ---------------------------------------------------------------------------------------

def test_chat_logprobs_equal_a_direct_forward_pass(client, demo):
    import torch

    tok, model = demo
    answer = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    assert_valid(answer.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    content = answer.choices[0].logprobs.content
    assert len(content) == 10 and "".join(t.token for t in content) == answer.choices[0].message.content
    # The reference: greedy decoding by hand with full forward passes, each step's log_softmax kept.
    text = tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for entry in content:
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            token = int(reference.argmax())
            assert bytes(entry.bytes) == tok.convert_tokens_to_string([tok.convert_ids_to_tokens(token)]).encode(
                errors="surrogateescape") or "\ufffd" in entry.token
            assert abs(entry.logprob - float(reference[token])) < 1e-4
            top = entry.top_logprobs
            assert len(top) == 5 and top[0].logprob == entry.logprob  # greedy: the chosen is the likeliest
            assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
            assert abs(top[1].logprob - float(reference.topk(2).values[1])) < 1e-4
            ids.append(token)


def test_streamed_logprobs_are_the_non_streamed_ones(client):
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    pieces = [lp for chunk in client.chat.completions.create(**kwargs, stream=True) for c in chunk.choices
              if c.logprobs is not None for lp in c.logprobs.content]
    assert [(p.token, p.logprob) for p in pieces] == [(w.token, w.logprob) for w in whole]


def test_no_logprobs_unless_asked(server):
    body = post(server, "/v1/chat/completions", messages=ASK, max_tokens=4).json()
    assert body["choices"][0]["logprobs"] is None


def test_completions_logprobs_in_the_legacy_shape(server):
    r = post(server, "/v1/completions", prompt="Paris is the capital of", max_tokens=6, temperature=0,
             logprobs=3, ignore_eos=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "CreateCompletionResponse")
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == 6
    # A dict by token text: tokens whose texts coincide (partial UTF-8 shown as U+FFFD) share an entry.
    assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"]) and any(len(t) == 3 for t in lp["top_logprobs"])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(6)]


# --- structured output ------------------------------------------------------------------------------

class Person(BaseModel):
    name: str = Field(max_length=10)
    role: Literal["admin", "user", "guest"]
    tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=2)  # a random model needs bounds


def test_parse_returns_a_valid_pydantic_instance_every_time(client):
    for seed in range(8):
        parsed = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person,
                                               temperature=1, seed=seed, max_tokens=220)
        choice = parsed.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Person)


async def test_sampled_completions_all_validate_beside_unchanged_free_rows(async_client):
    """100+ sampled answers under a nested schema, in shared batches with greedy free rows, whose tokens
    must equal what they are alone."""
    free = [dict(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0,
                 extra_body={"ignore_eos": True}) for p in ("one two", "tell me a story", "x y z")]
    alone = [(await async_client.chat.completions.create(**f)).choices[0].message.content for f in free]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    constrained = [async_client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, n=8,
                                                        temperature=1, seed=seed, max_tokens=220)
                   for seed in range(13)]
    results = await asyncio.gather(*constrained, *(async_client.chat.completions.create(**f) for f in free))
    answers = [c for r in results[:13] for c in r.choices]
    assert len(answers) == 104
    for choice in answers:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in answers}) > 50  # really sampled
    assert [r.choices[0].message.content for r in results[13:]] == alone


@pytest.mark.parametrize("outputs, check", [
    ({"choice": ["yes", "no", "maybe so"]}, lambda text: text in ("yes", "no", "maybe so")),
    ({"regex": "[A-Z][a-z]{2,6} [0-9]{3}"}, lambda text: re.fullmatch("[A-Z][a-z]{2,6} [0-9]{3}", text)),
    ({"json": {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 999},
               "minItems": 2, "maxItems": 4}},
     lambda text: 2 <= len(json.loads(text)) <= 4),
    ({"grammar": 'start: "x=" NUM ";"\nNUM: /[0-9]{1,4}/'}, lambda text: re.fullmatch(r"x=[0-9]{1,4};", text)),
    ({"grammar": 'root ::= "ab" [0-9]'}, lambda text: re.fullmatch("ab[0-9]", text)),  # GBNF
])
def test_structured_outputs_on_chat_and_completions(server, outputs, check):
    for route, prompt in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "x"})):
        for seed in range(3):
            r = post(server, route, **prompt, structured_outputs=outputs, temperature=1, seed=seed, max_tokens=60)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert choice["finish_reason"] == "stop" and check(text), (route, text)


def test_json_object_gives_a_json_object(client):
    answer = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1, seed=3, max_tokens=220,
                                            response_format={"type": "json_object"})
    if answer.choices[0].finish_reason == "stop":  # any object may be long: a cut one is still a prefix
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:
        assert answer.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "tool_choice"),
])
def test_what_cannot_be_enforced_is_a_400_naming_it(server, body, param):
    r = post(server, "/v1/chat/completions", messages=ASK, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


# --- tool calls -------------------------------------------------------------------------------------

def _check_calls(calls, names, count=None):
    assert calls and (count is None or len(calls) == count)
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_a_required_tool_call_comes_back_parsed(client, server):
    for seed in range(4):
        answer = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice="required", parallel_tool_calls=False,
                                                temperature=1, seed=seed, max_tokens=220)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls, TOOL_SCHEMAS, count=1)
    r = post(server, "/v1/chat/completions", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
             temperature=1, seed=1, max_tokens=220)
    assert_valid(r.json(), "CreateChatCompletionResponse")


def test_a_named_tool_call_streams_as_openai_does(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=1, seed=5, max_tokens=220,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    _check_calls(whole.message.tool_calls, {"get_weather"}, count=1)
    pieces, finish = [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            assert len(c.delta.tool_calls or []) <= 1  # one call a chunk (instructor reads only the first)
            pieces += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    first, rest = pieces[0], pieces[1:]
    assert first.id.startswith("call_") and first.function.name == "get_weather" and first.type == "function"
    assert all(p.id is None and p.function.name is None and p.index == 0 for p in rest)  # fragments
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert arguments == whole.message.tool_calls[0].function.arguments and finish == "tool_calls"


def test_a_tool_conversation_is_rendered_and_answered(client):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1).usage.prompt_tokens + 20  # the history and tools were rendered


def _nested(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


HOSTILE = {
    "deep schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": _nested(300)}}},
    "huge enum": {"structured_outputs": {"json": {"enum": [f"value {i}" for i in range(100_000)]}}},
    "explosive regex": {"structured_outputs": {"regex": "(a|b|ab|ba)*c{1,900}" * 12}},
    "many tools": {"tools": [{**WEATHER, "function": {**WEATHER["function"], "name": f"t{i}"}} for i in range(128)],
                   "tool_choice": "required"},
}


def test_hostile_constraints_are_answered_quickly_and_stall_no_one(server):
    """Schemas and patterns that are cheap to send and costly to compile: each is answered (a 400 that
    names the problem, or a 200), and a small request beside them is not held up."""
    import concurrent.futures
    import time

    def timed(body):
        started = time.perf_counter()
        r = post(server, "/v1/chat/completions", messages=ASK, max_tokens=4, **body)
        return r, time.perf_counter() - started

    baseline = min(timed({})[1] for _ in range(3))
    with concurrent.futures.ThreadPoolExecutor(len(HOSTILE) + 1) as pool:
        hostile = {name: pool.submit(timed, body) for name, body in HOSTILE.items()}
        time.sleep(0.2)
        small = [timed({})[1] for _ in range(3)]
        for name, future in hostile.items():
            r, seconds = future.result()
            assert r.status_code in (200, 400), (name, r.text[:300])
            assert seconds < 30, (name, seconds)
            if r.status_code == 400:
                assert_valid(r.json(), "ErrorResponse")
                message = r.json()["error"]["message"]
                assert any(why in message for why in ("cannot be compiled", "values nested at most",
                                                      "maximum context length")), (name, message)
    assert min(small) < baseline + 2.0, (baseline, small)


def test_on_demand_models_have_the_same_features(client):
    """A multiplexed (on-demand) model runs the same engine: constraints, logprobs and forced calls."""
    answer = client.chat.completions.create(model="demo-chat-s1", messages=ASK, temperature=1, seed=2,
                                            max_tokens=200, logprobs=True, top_logprobs=1,
                                            extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    choice = answer.choices[0]
    assert choice.message.content in ("red", "green") and choice.finish_reason == "stop"
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content


def test_streamed_chunks_with_tool_calls_and_logprobs_validate(server):
    """Raw SSE, as any client sees it: every chunk validates against the spec's stream response."""
    r = requests.post(f"{server}/v1/chat/completions", timeout=120, stream=True, json={
        "model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "stream": True,
        "logprobs": True, "top_logprobs": 2, "temperature": 1, "seed": 4, "max_tokens": 200,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    assert any(c["choices"] and c["choices"][0].get("logprobs") for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
