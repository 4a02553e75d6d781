"""Completions, responses and tokenize without Ray: wire request -> engine requests (one per prompt),
record streams merged across prompts, records -> wire chunks and events (validated against the spec)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from app.config import GenerationLimits
from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol.completions import CompletionRequest
from app.protocol.responses import ResponsesRequest
from app.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from app.serving.completions import collect_completion, completion_chunks
from app.serving.responses import RESPONSES, response_events
from deployments.engines.completion_params import prepare_completion
from deployments.engines.prepared import Prepared, merged
from deployments.engines.records import Delta, GenerationRequest, SamplingParams
from deployments.engines.tokenize import run_tokenizer
from tests.openapi_schema import assert_valid, assert_valid_event


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoTokenizer

    from deployments.models.sources import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("demo:chat"))
    return SimpleNamespace(tokenizer=tokenizer, context_len=64, vocab_size=len(tokenizer))


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(model="m", **{"prompt": "hi", **fields})


def test_each_prompt_is_one_engine_request_with_openai_defaults(engine):
    prepared = prepare_completion(completion(prompt=["one two", "three"], n=2, temperature=0), engine,
                                  GenerationLimits())
    tok = engine.tokenizer
    assert [r.prompt_ids for r in prepared.requests] == [tok("one two")["input_ids"], tok("three")["input_ids"]]
    assert all(r.n == 2 and r.params.max_new_tokens == 16 and r.params.greedy for r in prepared.requests)
    assert prepared.echo == []
    ids = prepare_completion(completion(prompt=[[5, 6], [7]], echo=True, max_tokens=None), engine,
                             GenerationLimits(default_max_tokens=9))
    assert [r.prompt_ids for r in ids.requests] == [[5, 6], [7]]
    assert ids.echo == [tok.decode([5, 6]), tok.decode([7])]
    assert ids.requests[0].params.max_new_tokens == 9  # null max_tokens: the model's default


@pytest.mark.parametrize("fields, param, error", [
    ({"prompt": [1, 10**6]}, "prompt", InvalidRequest),
    ({"prompt": [[1], [2, 10**6]]}, "prompt[1]", InvalidRequest),
    ({"prompt": "word " * 500}, "prompt", ContextLengthExceeded),
    ({"prompt": ["ok", "x" * 10**6]}, "prompt[1]", ContextLengthExceeded),
    ({"prompt": "hi", "max_tokens": 100}, "max_tokens", ContextLengthExceeded),
    ({"prompt": "hi", "n": 99}, "n", InvalidRequest),
])
def test_bad_prompts_name_the_prompt_at_fault(engine, fields, param, error):
    with pytest.raises(error) as info:
        prepare_completion(completion(**fields), engine, GenerationLimits())
    assert info.value.param == param


@pytest.mark.parametrize("fields, param", [
    ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": 3}, "prompt"),
    ({"prompt": [True]}, "prompt"), ({"suffix": "x"}, "suffix"), ({"logprobs": 6}, "logprobs"),
    ({"echo": True, "logprobs": 1}, "echo"), ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"best_of": 3}, "best_of"), ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_wire_refusals(fields, param):
    with pytest.raises(ValidationError) as info:
        completion(**fields)
    assert param in str(info.value)


def _request(n: int) -> GenerationRequest:
    return GenerationRequest(prompt_ids=[1], params=SamplingParams(max_new_tokens=4), n=n)


async def _stream(items):
    for batch in items:
        await asyncio.sleep(0)
        yield batch


async def test_merged_numbers_choices_across_prompts_and_echoes_first():
    prepared = Prepared([_request(2), _request(2)], echo=["A", "B"])
    first = [[Delta(0, "x")], [Delta(1, "y", finish_reason="stop", prompt_tokens=3, completion_tokens=1)],
             [Delta(0, "", finish_reason="length", prompt_tokens=3, completion_tokens=2)]]
    second = [[Delta(0, "z", finish_reason="stop", prompt_tokens=5, completion_tokens=1),
               Delta(1, "w", finish_reason="stop", prompt_tokens=5, completion_tokens=1)]]
    out = [b async for b in merged(prepared, [_stream(first), _stream(second)])]
    assert [(d.index, d.text) for d in out[0]] == [(0, "A"), (1, "A"), (2, "B"), (3, "B")]
    seen = sorted((d.index, d.text) for b in out[1:] for d in b)
    assert seen == [(0, ""), (0, "x"), (1, "y"), (2, "z"), (3, "w")]
    assert all(r.cancelled for r in prepared.requests)  # done: nothing may keep rows


async def test_merged_closes_every_stream_when_the_reader_leaves_or_one_fails():
    closed = []

    async def endless(k):
        try:
            while True:
                await asyncio.sleep(0.001)
                yield [Delta(0, str(k))]
        finally:
            closed.append(k)

    prepared = Prepared([_request(1), _request(1)])
    reader = merged(prepared, [endless(0), endless(1)])
    await anext(reader)
    await reader.aclose()
    assert sorted(closed) == [0, 1] and all(r.cancelled for r in prepared.requests)

    async def failing():
        yield [Delta(0, "a")]
        raise InvalidRequest("boom")

    closed.clear()
    with pytest.raises(InvalidRequest):
        [b async for b in merged(Prepared([_request(1), _request(1)]), [failing(), endless(1)])]
    assert closed == [1]


async def test_completion_chunks_collect_to_the_spec_body():
    records = [[Delta(0, "A"), Delta(1, "A"), Delta(2, "B"), Delta(3, "B")],
               [Delta(2, " b", finish_reason="stop", prompt_tokens=5, completion_tokens=1)],
               [Delta(0, " a", finish_reason="length", prompt_tokens=3, completion_tokens=4),
                Delta(1, "", finish_reason="stop", prompt_tokens=3, completion_tokens=1),
                Delta(3, "", finish_reason="stop", prompt_tokens=5, completion_tokens=1)]]
    body = await collect_completion(completion_chunks(_stream(records), model="m", n=2, include_usage=True))
    dumped = body.model_dump()
    assert_valid(dumped, "CreateCompletionResponse")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in dumped["choices"]] == [
        (0, "A a", "length"), (1, "A", "stop"), (2, "B b", "stop"), (3, "B", "stop")]
    assert dumped["usage"] == {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15}


async def _events(body, records):
    return [e async for e in response_events(_stream(records), body)]


@pytest.mark.parametrize("finish, last", [("stop", "response.completed"), ("length", "response.incomplete")])
async def test_response_events_follow_the_documented_sequence(finish, last):
    body = ResponsesRequest(model="m", input="hi", instructions="be brief")
    records = [[Delta(0, "Hel")], [Delta(0, "lo", finish_reason=finish, prompt_tokens=7, completion_tokens=2)]]
    events = [RESPONSES.dump(e, body) for e in await _events(body, records)]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", last]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        assert_valid_event(event)
    final = events[-1]["response"]
    assert_valid(final, "Response")
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["instructions"] == "be brief"
    assert final["usage"]["input_tokens"] == 7 and final["usage"]["total_tokens"] == 9
    assert (final["status"], final["incomplete_details"]) == (
        ("completed", None) if finish == "stop" else ("incomplete", {"reason": "max_output_tokens"}))


def test_responses_map_onto_one_chat_request():
    body = ResponsesRequest(model="m", instructions="sys", max_output_tokens=5, temperature=0.5, input=[
        {"role": "user", "content": "a"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "c"}, {"type": "input_text", "text": "d"}]}])
    chat = body.chat_request()
    assert [(m.role, m.text()) for m in chat.messages] == [("system", "sys"), ("user", "a"), ("assistant", "b"),
                                                           ("user", "cd")]
    assert chat.requested_max_tokens == 5 and chat.temperature == 0.5 and chat.n == 1


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "type"),
    ({"input": []}, "input"), ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"background": True}, "background"), ({"reasoning": {"effort": "high"}}, "reasoning"),
])
def test_responses_refusals(fields, param):
    with pytest.raises(ValidationError) as info:
        ResponsesRequest(model="m", **{"input": "hi", **fields})
    assert param in str(info.value)


def test_tokenize_counts_what_generation_sees(engine):
    from deployments.engines.chat_params import render_prompt

    out = run_tokenizer(TokenizeRequest(model="m", prompt="hello world", return_token_strs=True), engine, GenerationLimits())
    assert out.tokens == engine.tokenizer("hello world")["input_ids"] and out.max_model_len == 64
    assert "".join(out.token_strs).replace("\u0120", " ") == "hello world"
    chat = TokenizeRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert run_tokenizer(chat, engine, GenerationLimits()).tokens == render_prompt(engine.tokenizer, chat.chat_request())
    assert run_tokenizer(DetokenizeRequest(model="m", tokens=out.tokens), engine, GenerationLimits()).prompt == "hello world"
    with pytest.raises(InvalidRequest):
        run_tokenizer(DetokenizeRequest(model="m", tokens=[10**6]), engine, GenerationLimits())
    with pytest.raises(ContextLengthExceeded):
        run_tokenizer(TokenizeRequest(model="m", prompt="x" * 10**6), engine, GenerationLimits())
    with pytest.raises(ValidationError):
        TokenizeRequest(model="m", prompt="a", messages=[{"role": "user", "content": "b"}])


def test_the_size_bound_applies_to_each_prompt_not_their_sum(engine):
    from deployments.engines.chat_params import prompt_bytes_limit

    limit = prompt_bytes_limit(engine.tokenizer, engine.context_len)
    many = completion(prompt=["a"] * 200 + ["b" * (limit // 2)] * 4)
    assert many.text_size_over(limit) is None
    assert completion(prompt=["a", "b" * (limit + 1)]).text_size_over(limit) == limit + 1
    with pytest.raises(ContextLengthExceeded) as info:
        prepare_completion(completion(prompt=["a", "b" * (limit + 1)]), engine, GenerationLimits())
    assert info.value.param == "prompt[1]"
