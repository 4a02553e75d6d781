"""/v1/responses with tools, structured output and logprobs, without Ray: the request as the chat request
it maps onto (and the prompt that renders), refusals naming the responses parameter, and the events that
engine deltas (text, tool-call pieces, logprobs) become, each valid against the vendored spec."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from app.errors import ContextLengthExceeded, InvalidRequest, validation_error
from app.protocol.chat import ChatCompletionRequest
from app.protocol.responses import ResponsesRequest
from app.serving.responses import RESPONSES, renamed, response_events
from deployments.engines.records import Delta, TokenLogprob, ToolCallDelta
from tests.openapi_schema import assert_valid, assert_valid_event

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER,
        "strict": True}
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}',
     "id": "fc_1", "status": "completed"},
    {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "20C"},
    {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "1"},
                                                                      {"type": "input_text", "text": "5C"}]},
]
# The same conversation as chat messages (OpenAI's chat shape).
CHAT_HISTORY = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "20C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "15C"},
]


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def test_tools_history_and_settings_map_onto_the_equivalent_chat_request():
    body = request(instructions="be brief", input=HISTORY, tools=[TOOL], tool_choice="required",
                   parallel_tool_calls=False, top_logprobs=3, seed=7, max_output_tokens=30)
    chat = body.chat_request()
    expected = ChatCompletionRequest.model_validate({
        "model": "m", "messages": CHAT_HISTORY, "tool_choice": "required", "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}],
        "logprobs": True, "top_logprobs": 3, "seed": 7, "max_completion_tokens": 30})
    assert chat.model_dump() == expected.model_dump()
    named = request(tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}).chat_request()
    assert named.tool_choice.function.name == "get_weather" and [t.function.name for t in named.forced_tools] == [
        "get_weather"]


def test_the_history_renders_the_prompt_of_the_chat_conversation():
    from transformers import AutoTokenizer

    from deployments.engines.chat_params import render_prompt
    from deployments.models.sources import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("demo:chat"))
    body = request(instructions="be brief", input=HISTORY, tools=[TOOL])
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": CHAT_HISTORY, "tools": [
        {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]})
    ours = tokenizer.decode(render_prompt(tokenizer, body.chat_request()))
    assert ours == tokenizer.decode(render_prompt(tokenizer, chat))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>' in ours
    assert "<tool_response>\n15C\n</tool_response>" in ours and '"name": "get_weather"' in ours


@pytest.mark.parametrize("fmt, expected", [
    ({"type": "text"}, None), ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True, "description": "d"},
     {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True, "description": "d"}}),
])
def test_text_format_is_the_chat_response_format(fmt, expected):
    chat = request(text={"format": fmt}).chat_request()
    got = chat.response_format.model_dump(by_alias=True, exclude_none=True) if chat.response_format else None
    assert got == expected
    assert request(include=["message.output_text.logprobs"]).chat_request().top_logprobs_asked == 0
    assert request().chat_request().top_logprobs_asked is None


@pytest.mark.parametrize("fields, param", [
    ({"tools": [TOOL, {"type": "web_search"}]}, "tools[1].type"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "no spaces"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "absent"}}, "tool_choice.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "reasoning", "summary": []}]}, "input[1].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [HISTORY[2], {"type": "function_call_output", "call_id": "other", "output": "x"}]}, "input[1].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file"}]}]},
     "input[0].output[0].type"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"text": {"format": {"type": "json_schema", "schema": WEATHER}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "w"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"top_logprobs": 21}, "top_logprobs"),
])
def test_refusals_name_the_responses_parameter(fields, param):
    with pytest.raises(ValidationError) as info:
        request(**fields)
    assert validation_error(info.value.errors()).param == param


def test_errors_of_the_mapped_chat_request_name_the_responses_parameter():
    schema = InvalidRequest("response_format.json_schema.schema cannot be compiled into a grammar: x",
                            param="response_format.json_schema.schema")
    out = renamed(schema)
    assert (out.param, out.message) == ("text.format.schema", "text.format.schema cannot be compiled into a grammar: x")
    assert type(out) is InvalidRequest and schema.param == "response_format.json_schema.schema"  # a copy

    class RayTaskError(Exception):  # Ray carries a replica's error as ``cause``
        cause = ContextLengthExceeded("the messages use 300 tokens", param="messages")

    out = renamed(RayTaskError())
    assert isinstance(out, ContextLengthExceeded) and out.code == "context_length_exceeded"
    assert (out.param, out.message) == ("input", "the input items use 300 tokens")
    out = renamed(InvalidRequest("Invalid value for 'messages[2].tool_calls': too many",
                                 param="messages[2].tool_calls"))
    assert (out.param, out.message) == ("input", "Invalid value for 'input': too many")
    untouched = InvalidRequest("n must be at most 4", param="n")
    assert renamed(untouched) is untouched and renamed(KeyError("x")).__class__ is KeyError


async def _events(body, records):
    async def stream():
        for batch in records:
            await asyncio.sleep(0)
            yield batch
    return [RESPONSES.dump(e, body) for e in [e async for e in response_events(stream(), body)]]


def _valid(events):
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        assert_valid_event(event)
    assert_valid(events[-1]["response"], "Response")
    return events[-1]["response"]


def _call(index, name, *fragments, id_="call_x"):
    return [ToolCallDelta(index=index, id=f"{id_}{index}", name=name, arguments=fragments[0]),
            *(ToolCallDelta(index=index, arguments=f) for f in fragments[1:])]


async def test_text_then_calls_are_a_message_then_function_call_items():
    body = request(tools=[TOOL], tool_choice="auto")
    first, second = _call(0, "get_weather", '{"city": ', '"Paris"}'), _call(1, "get_weather", '{"city": "Lyon"}')
    records = [[Delta(0, "Let me")], [Delta(0, " look.", tool_calls=first[:1])], [Delta(0, tool_calls=first[1:])],
               [Delta(0, tool_calls=second, finish_reason="tool_calls", prompt_tokens=9, completion_tokens=20)]]
    events = await _events(body, records)
    final = _valid(events)
    assert [e["type"].removeprefix("response.") for e in events] == [
        "created", "in_progress", "output_item.added", "content_part.added", "output_text.delta",
        "output_text.delta", "output_text.done", "content_part.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.delta",
        "function_call_arguments.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.done", "output_item.done",
        "completed"]
    message, call0, call1 = final["output"]
    assert message["content"][0]["text"] == "Let me look." and message["status"] == "completed"
    assert [(c["type"], c["call_id"], c["name"], c["arguments"], c["status"]) for c in (call0, call1)] == [
        ("function_call", "call_x0", "get_weather", '{"city": "Paris"}', "completed"),
        ("function_call", "call_x1", "get_weather", '{"city": "Lyon"}', "completed")]
    assert call0["id"].startswith("fc_") and call0["id"] != call1["id"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [(0, "message"), (1, "function_call"),
                                                                       (2, "function_call")]
    assert added[1]["item"]["arguments"] == "" and added[1]["item"]["status"] == "in_progress"
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(e["delta"] for e in deltas if e["item_id"] == call0["id"]) == call0["arguments"]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["item_id"], e["output_index"], e["name"], e["arguments"]) for e in done] == [
        (call0["id"], 1, "get_weather", call0["arguments"]), (call1["id"], 2, "get_weather", call1["arguments"])]
    assert final["status"] == "completed" and final["tools"] == [TOOL] and final["tool_choice"] == "auto"
    assert final["usage"]["output_tokens"] == 20


async def test_calls_alone_have_no_message_and_a_cut_call_is_incomplete():
    body = request(tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    records = [[Delta(0, tool_calls=_call(0, "get_weather", '{"ci'))],
               [Delta(0, finish_reason="length", prompt_tokens=3, completion_tokens=4)]]
    final = _valid(await _events(body, records))
    assert [(i["type"], i["status"], i["arguments"]) for i in final["output"]] == [("function_call", "incomplete",
                                                                                     '{"ci')]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["tool_choice"] == {"type": "function", "name": "get_weather"} and final["parallel_tool_calls"] is False
    empty = _valid(await _events(request(), [[Delta(0, finish_reason="stop", prompt_tokens=3)]]))
    assert [(i["type"], i["content"][0]["text"]) for i in empty["output"]] == [("message", "")]


def _lp(token, logprob, *top):
    return TokenLogprob(token=token, bytes=token.encode(), logprob=logprob,
                        top=tuple((t, t.encode(), lp) for t, lp in top))


async def test_logprobs_go_with_the_text_they_spell():
    body = request(top_logprobs=1, text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER}})
    records = [[Delta(0, '{"', logprobs=[_lp('{"', -0.5, ('{"', -0.5))])],
               [Delta(0, "", logprobs=[_lp("ci", -0.25, ("ci", -0.25))])],  # held (e.g. by a parser): no text yet
               [Delta(0, 'city": "P"}', logprobs=[_lp('ty": "P"}', -1.0, ('ty": "P"}', -1.0))],
                      finish_reason="stop", prompt_tokens=2, completion_tokens=3)]]
    events = await _events(body, records)
    final = _valid(events)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [[lp["token"] for lp in e["logprobs"]] for e in deltas] == [['{"'], ["ci", 'ty": "P"}']]
    assert deltas[0]["logprobs"][0] == {"token": '{"', "logprob": -0.5, "bytes": list(b'{"'), "top_logprobs": [
        {"token": '{"', "logprob": -0.5, "bytes": list(b'{"')}]}
    part = final["output"][0]["content"][0]
    assert json.loads(part["text"]) == {"city": "P"}
    assert [lp["logprob"] for lp in part["logprobs"]] == [-0.5, -0.25, -1.0]
    text_done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text_done["logprobs"] == part["logprobs"]
    assert final["top_logprobs"] == 1
    assert final["text"] == {"format": {"type": "json_schema", "name": "w", "schema": WEATHER}}
