"""Wire models: what is accepted, what is refused (with the param named), and schema conformance."""

import pickle

import pytest
from pydantic import ValidationError

from app.errors import (ContextLengthExceeded, ModelNotFound, Overloaded, as_serving_error,
                        validation_error)
from app.protocol.chat import (AssistantMessage, ChatCompletionChunk, ChatCompletionRequest,
                               ChatCompletionResponse, Choice, ChunkChoice, Delta)
from app.protocol.common import Usage
from app.protocol.models import ModelCard, ModelList
from tests.openapi_schema import assert_valid

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def refused(**fields) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**BASE, **fields})
    err = validation_error(info.value.errors())
    assert err.status_code == 400
    return err.param, err.message


def test_accepts_text_parts_and_vendor_extras():
    req = ChatCompletionRequest.model_validate({
        **BASE, "messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]}],
        "top_k": 5, "some_vendor_field": 1, "max_completion_tokens": 9, "max_tokens": 3})
    assert req.messages[1].text() == "ab"
    assert req.requested_max_tokens == 9  # max_completion_tokens wins
    assert req.stop_list == []


@pytest.mark.parametrize("fields,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [TOOL], "tool_choice": "bogus"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]}]},
     "messages[0].tool_calls[0].function"),
])
def test_bad_values_are_refused_naming_the_param(fields, param):
    got, message = refused(**fields)
    assert got == param, message


def test_invalid_json_is_a_400_without_param():
    err = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                             "ctx": {"error": "Expecting value"}}])
    assert err.status_code == 400 and err.param is None and "JSON" in err.message


def test_response_models_validate_against_openai_schema():
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    resp = ChatCompletionResponse(id="c", created=1, model="m", usage=usage, choices=[
        Choice(index=0, message=AssistantMessage(content="hi"), finish_reason="stop")])
    assert_valid(resp.model_dump(), "CreateChatCompletionResponse")
    for chunk in [
        ChatCompletionChunk(id="c", created=1, model="m",
                            choices=[ChunkChoice(index=0, delta=Delta(role="assistant", content=""))]),
        ChatCompletionChunk(id="c", created=1, model="m",
                            choices=[ChunkChoice(index=0, delta=Delta(), finish_reason="length")]),
        ChatCompletionChunk(id="c", created=1, model="m", choices=[], usage=usage),
    ]:
        assert_valid(chunk.model_dump(), "CreateChatCompletionStreamResponse")
    assert ChunkChoice(index=0, delta=Delta(content="x")).model_dump()["delta"] == {"content": "x"}
    assert_valid(ModelList(data=[ModelCard(id="m", created=1)]).model_dump(), "ListModelsResponse")


def test_errors_render_the_openai_body_and_survive_pickling():
    err = ContextLengthExceeded("too long", param="messages")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ContextLengthExceeded and again.body() == err.body()
    assert again.body()["error"]["code"] == "context_length_exceeded"
    assert_valid(again.body(), "ErrorResponse")
    missing = pickle.loads(pickle.dumps(ModelNotFound("nope")))
    assert missing.status_code == 404 and missing.param == "model" and "nope" in missing.message


def test_ray_errors_map_to_openai_errors():
    from ray.serve.exceptions import BackPressureError

    err = as_serving_error(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert isinstance(err, Overloaded) and err.status_code == 503 and err.headers["Retry-After"]
    assert as_serving_error(KeyError("x")).status_code == 500
    assert "KeyError" not in as_serving_error(KeyError("x")).message


def refusal(**fields) -> dict:
    """The error body of a refused request (raises if it is accepted)."""
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**BASE, **fields})
    body = validation_error(info.value.errors()).body()
    assert_valid(body, "ErrorResponse")
    return body["error"]


@pytest.mark.parametrize("fields,param", [
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 2.0}, "max_completion_tokens"),
    ({"n": "2"}, "n"),
    ({"seed": True}, "seed"),
    ({"ignore_eos": "true"}, "ignore_eos"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": False}, "temperature"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stop_token_ids": [1, True]}, "stop_token_ids[1]"),
])
def test_booleans_and_integers_are_strict(fields, param):
    err = refusal(**fields)
    assert err["param"] == param, err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "min_p"])
def test_nan_and_infinity_are_refused_saying_so(field, value):
    err = refusal(**{field: value})
    assert err["param"] == field and "NaN and Infinity" in err["message"]
    assert refusal(logit_bias={"3": value})["param"] == "logit_bias.3"


@pytest.mark.parametrize("fields,param", [
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"},
                                                {"type": "text", "text": "\udfff"}]}]},
     "messages[0].content[1].text"),
    ({"messages": [{"role": "user", "content": "x", "name": "\udc00"}]}, "messages[0].name"),
    ({"stop": "\ud800"}, "stop"),
    ({"stop": ["a", "b\ud800"]}, "stop[1]"),
    ({"user": "\ud800"}, "user"),
    ({"chat_template_kwargs": {"a": {"b": ["x", "\ud800"]}}}, "chat_template_kwargs.a.b[1]"),
    ({"chat_template_kwargs": {"\ud800": 1}}, "chat_template_kwargs"),
    ({"metadata": {"k": "\ud800"}}, "metadata.k"),
])
def test_lone_surrogates_are_refused_naming_the_field(fields, param):
    err = refusal(**fields)
    assert (err["param"], err["code"]) == (param, "invalid_unicode"), err


def test_other_unusual_text_is_accepted():
    text = "nul\x00 rtl\u202e\u200f combining e\u0301 emoji \U0001f600 bom \ufeff nonchar \uffff"
    req = ChatCompletionRequest.model_validate({**BASE, "messages": [{"role": "user", "content": text}],
                                                "stop": ["\x00"], "user": "\u202e"})
    assert req.messages[0].text() == text


@pytest.mark.parametrize("fields,param", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"best_of": 2}, "best_of"),
    ({"messages": [{"role": "system", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,A"}}
                                               for _ in range(65)]}]}, "messages[0].content[64]"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "function", "content": "42", "name": "f"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "x", "function_call": {"name": "f"}}]},
     "messages[0].function_call"),
])
def test_unsupported_features_are_refused_in_one_shape(fields, param):
    err = refusal(**fields)
    assert (err["param"], err["code"], err["type"]) == (param, "unsupported_parameter",
                                                         "invalid_request_error"), err
    assert err["message"].startswith(f"'{param}' is not supported by this server: ")


@pytest.mark.parametrize("fields,param", [
    ({"tool_choice": "none"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "absent"}}},
     "tool_choice.function.name"),
    ({"structured_outputs": {"regex": "a+"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": False}}, "stream_options"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ({"messages": [{"role": "assistant", "content": "Once"}], "continue_final_message": True},
     "continue_final_message"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),
])
def test_parameters_that_need_another_are_refused(fields, param):
    err = refusal(**fields)
    assert (err["param"], err["code"]) == (param, "invalid_parameter_combination"), err


def test_metadata_and_defaults_are_accepted_as_no_ops():
    req = ChatCompletionRequest.model_validate({
        **BASE, "store": True, "metadata": {"team": "a"}, "service_tier": "auto", "modalities": ["text"],
        "logprobs": False, "tools": [], "functions": [], "best_of": 1, "response_format": {"type": "text"},
        "stream": True, "stream_options": {"include_usage": True}, "parallel_tool_calls": False})
    assert req.store is True and req.include_usage
    assert refusal(service_tier="bogus")["param"] == "service_tier"
    assert refusal(metadata={str(i): "v" for i in range(17)})["param"] == "metadata"


def test_vllm_extras_parse_and_bound():
    req = ChatCompletionRequest.model_validate({
        **BASE, "min_p": 0.1, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [3, 4],
        "logit_bias": {"5": -100, "6": 2.5}, "chat_template_kwargs": {"enable_thinking": False},
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Once"}],
        "add_generation_prompt": False, "continue_final_message": True, "echo": True, "best_of": 1})
    assert req.logit_bias == {"5": -100.0, "6": 2.5} and req.stop_token_ids == [3, 4]
    assert req.echo_text == "Once"
    assert refusal(logit_bias={"x1": 1})["param"] == "logit_bias"
    assert refusal(logit_bias={"1" * 11: 1})["param"] == "logit_bias"
    assert refusal(logit_bias={"1": 101})["param"] == "logit_bias.1"
    assert refusal(chat_template_kwargs={"not an identifier": 1})["param"] == "chat_template_kwargs"
    deep: dict = {}
    node = deep
    for _ in range(2000):  # deeper than the stack: refused, not a RecursionError
        node["a"] = {}
        node = node["a"]
    assert refusal(chat_template_kwargs={"x": deep})["param"] == "chat_template_kwargs"


def test_echo_follows_the_answer_role():
    def echo_of(**fields):
        return ChatCompletionRequest.model_validate({**BASE, "echo": True, **fields}).echo_text

    assert echo_of() == ""  # the last message is the user's; the answer is the assistant's
    assert echo_of(add_generation_prompt=False) == "hi"  # vLLM: the answer then continues that role
    assert echo_of(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "b"


def test_validation_error_without_location_does_not_crash():
    assert validation_error([{"type": "value_error", "loc": (), "msg": "bad"}]).status_code == 400


def test_one_entry_per_call_in_a_streamed_chunk():
    from app.protocol.tools import tool_call_chunks
    from deployments.engines.records import ToolCallDelta

    pieces = [ToolCallDelta(0, "call_a", "f", '{"x"'), ToolCallDelta(0, arguments=": 1"), ToolCallDelta(0, arguments="}"),
              ToolCallDelta(1, "call_b", "g", "{"), ToolCallDelta(1, arguments="}")]
    out = [c.model_dump() for c in tool_call_chunks(pieces)]
    assert out == [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                   {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    later = tool_call_chunks([ToolCallDelta(0, arguments='"a'), ToolCallDelta(0, arguments='"')])
    assert [c.model_dump() for c in later] == [{"index": 0, "function": {"arguments": '"a"'}}]


def test_sse_events_hold_no_character_that_python_reads_as_a_line_break():
    """A model may write U+2028: httpx's aiter_lines (str.splitlines) would split the event there."""
    import json

    from app.streaming import sse_data

    text = "x\u2028y\x85z\u2029 \u00e9\n\x0b"
    event = sse_data({"content": text})
    assert event.endswith("\n\n") and len(event.splitlines()) == 2 and "\u00e9" in event  # not all escaped
    assert json.loads(event[len("data: "):]) == {"content": text}
