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
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
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
