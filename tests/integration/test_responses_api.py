"""``/v1/responses`` over real HTTP, the `openai` SDK and the OpenAI Agents SDK against the session's Ray
Serve: the documented event sequence, each event valid against the spec, and the same answer as the chat
request it maps onto."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from tests.conftest import TEST_APP_ARGS
from tests.openapi_schema import assert_valid, assert_valid_event

MODEL = "demo-chat"
CONTEXT = next(m for m in TEST_APP_ARGS["models"] if m["id"] == MODEL)["limits"]["max_context_len"]
# The demo model answers this prompt greedily with an end of turn after 18 tokens (a complete answer).
BRIEF = "me story"
# Bounded arguments (an enum, an integer range), so that even the random demo model's calls end.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 5}},
           "required": ["city", "days"], "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather forecast of a city",
        "parameters": WEATHER, "strict": True}


class Forecast(BaseModel):
    """A structured answer with bounded fields, so the random demo model's JSON ends well within the cap."""

    city: str = Field(max_length=12)
    celsius: int = Field(ge=-50, le=50)
    sunny: bool


def stream_events(server, body):
    """The SSE events of a streamed /v1/responses request, each validated against the spec."""
    with requests.post(f"{server}/v1/responses", stream=True, timeout=120, json={"model": MODEL, **body,
                                                                                "stream": True}) as r:
        assert r.status_code == 200, r.text
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line and line != "data: [DONE]"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        assert_valid_event(event)
    assert_valid(events[-1]["response"], "Response")
    return events


def chat_answer(client, text, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                          temperature=0, **kw).choices[0]


def test_non_streamed_body_validates_and_equals_chat(server, client):
    r = requests.post(f"{server}/v1/responses", timeout=60, json={
        "model": MODEL, "input": BRIEF, "temperature": 0, "max_output_tokens": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "Response")
    assert body["status"] == "completed" and body["incomplete_details"] is None
    chat = chat_answer(client, BRIEF, max_tokens=40)
    assert chat.finish_reason == "stop"
    assert body["output"][0]["content"][0]["text"] == chat.message.content
    sdk = client.responses.create(model=MODEL, input=BRIEF, temperature=0, max_output_tokens=40)
    assert sdk.output_text == chat.message.content and sdk.usage.output_tokens == body["usage"]["output_tokens"]


def test_event_sequence_validates_against_the_spec(server):
    with requests.post(f"{server}/v1/responses", stream=True, timeout=60, json={
            "model": MODEL, "input": [{"role": "user", "content": "tell me a story"}], "stream": True,
            "instructions": "be brief", "max_output_tokens": 12, "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line and line != "data: [DONE]"]
    types = [e["type"] for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # max_output_tokens cut it (ignore_eos is not needed: 12 tokens)
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        assert_valid_event(event)
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"} and final["usage"]["output_tokens"] == 12
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == \
        final["output"][0]["content"][0]["text"]


def test_sdk_stream_helper(client):
    with client.responses.stream(model=MODEL, input=[{"role": "user", "content": BRIEF}], temperature=0,
                                 max_output_tokens=40) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == chat_answer(client, BRIEF, max_tokens=40).message.content


async def test_agents_sdk_with_its_default_responses_model(server):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # the SDK would export traces to OpenAI
    async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="test", max_retries=0) as sdk:
        agent = Agent(name="demo", model=OpenAIResponsesModel(model=MODEL, openai_client=sdk),
                      model_settings=ModelSettings(temperature=0, max_tokens=40))
        result = await Runner.run(agent, BRIEF)
        expected = (await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": BRIEF}],
                                                      temperature=0, max_tokens=40)).choices[0].message.content
    assert result.final_output == expected


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_call_is_a_function_call_item_streamed_or_not(server, client, choice):
    asked = dict(input="What is the weather in Paris?", tools=[TOOL], tool_choice=choice, parallel_tool_calls=False,
                 temperature=1, max_output_tokens=120)
    events = stream_events(server, {**asked, "seed": 3})
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["tools"] == [TOOL] and final["tool_choice"] == choice
    [call] = final["output"]  # no message: the model only called
    assert (call["type"], call["name"], call["status"]) == ("function_call", "get_weather", "completed")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    of_call = [e for e in events if e.get("item_id") == call["id"] or e.get("item", {}).get("id") == call["id"]]
    assert [e["type"] for e in of_call][0] == "response.output_item.added" and of_call[0]["item"]["arguments"] == ""
    deltas = "".join(e["delta"] for e in of_call if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in of_call if e["type"] == "response.function_call_arguments.done")
    item_done = next(e for e in of_call if e["type"] == "response.output_item.done")
    assert deltas == done["arguments"] == item_done["item"]["arguments"] == call["arguments"]
    assert done["name"] == "get_weather" and done["output_index"] == 0
    sdk = client.responses.create(model=MODEL, **asked, extra_body={"seed": 3})  # the same seed: the same call
    assert [(o.type, o.name, o.arguments) for o in sdk.output] == [("function_call", "get_weather", call["arguments"])]
    assert sdk.output[0].call_id.startswith("call_") and sdk.output[0].id.startswith("fc_")
    with client.responses.stream(model=MODEL, **asked, extra_body={"seed": 3}) as stream:  # the SDK's accumulator
        streamed = stream.get_final_response()
    assert [(o.name, o.arguments) for o in streamed.output] == [("get_weather", call["arguments"])]


def test_a_function_call_history_is_answered_as_chat_answers_it(client):
    call = client.responses.create(model=MODEL, input="Weather in Lyon?", tools=[TOOL], tool_choice="required",
                                   parallel_tool_calls=False, max_output_tokens=120).output[0]
    history = [{"role": "user", "content": "Weather in Lyon?"}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 20C"}]
    answer = client.responses.create(model=MODEL, input=history, tools=[TOOL], temperature=0, max_output_tokens=30)
    assert answer.status in ("completed", "incomplete") and answer.output
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=30, messages=[
        {"role": "user", "content": "Weather in Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": {
            "name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 20C"}],
        tools=[{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}])
    message = chat.choices[0].message
    assert answer.usage.input_tokens == chat.usage.prompt_tokens  # the same prompt
    assert answer.output_text == (message.content or "")
    assert [(o.name, o.arguments) for o in answer.output if o.type == "function_call"] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls or ()]


def test_json_schema_output_parses_and_validates(client):
    schema = {**Forecast.model_json_schema(), "additionalProperties": False}  # else any further keys may follow
    for seed in (1, 2, 3):
        response = client.responses.create(
            model=MODEL, input="Forecast as JSON", temperature=1, max_output_tokens=200, extra_body={"seed": seed},
            text={"format": {"type": "json_schema", "name": "forecast", "schema": schema, "strict": True}})
        assert response.status == "completed", response.output_text
        jsonschema.validate(json.loads(response.output_text), schema)
        assert response.text.format.type == "json_schema" and response.text.format.name == "forecast"
    # Any object: the random model rarely closes one, so only its start is checked (the grammar's own tests
    # check the rest); a completed one parses.
    anything = client.responses.create(model=MODEL, input="JSON", temperature=1, max_output_tokens=20,
                                       extra_body={"seed": 1}, text={"format": {"type": "json_object"}})
    assert anything.output_text.lstrip().startswith("{") and anything.text.format.type == "json_object"
    assert anything.status == "incomplete" or isinstance(json.loads(anything.output_text), dict)


def test_sdk_parse_returns_the_model_instance(client):
    parsed = client.responses.parse(model=MODEL, input="Forecast", text_format=Forecast, temperature=1,
                                    max_output_tokens=200, extra_body={"seed": 2})
    assert isinstance(parsed.output_parsed, Forecast)
    assert Forecast.model_validate_json(parsed.output_text) == parsed.output_parsed


def test_top_logprobs_come_with_the_text(server, client):
    events = stream_events(server, {"input": BRIEF, "temperature": 0, "max_output_tokens": 12, "top_logprobs": 2})
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    part = events[-1]["response"]["output"][0]["content"][0]
    assert [lp for e in deltas for lp in e["logprobs"]] == part["logprobs"]
    assert len(part["logprobs"]) == events[-1]["response"]["usage"]["output_tokens"] == 12
    assert "".join(lp["token"] for lp in part["logprobs"]) == part["text"]
    for lp in part["logprobs"]:
        assert bytes(lp["bytes"]).decode("utf-8", "replace") == lp["token"] and len(lp["top_logprobs"]) == 2
        assert lp["top_logprobs"][0]["logprob"] >= lp["top_logprobs"][1]["logprob"]
        assert lp["logprob"] == lp["top_logprobs"][0]["logprob"]  # greedy: the chosen token is the likeliest
    assert events[-1]["response"]["top_logprobs"] == 2
    sdk = client.responses.create(model=MODEL, input=BRIEF, temperature=0, max_output_tokens=12, top_logprobs=2)
    assert [lp.token for lp in sdk.output[0].content[0].logprobs] == [lp["token"] for lp in part["logprobs"]]


async def test_agents_sdk_runs_a_required_function_tool(server):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    called = []

    @function_tool
    def get_weather(city: Literal["Paris", "Lyon"], days: Literal[1, 2, 3]) -> str:
        """The weather forecast of a city."""
        called.append((city, days))
        return f"sunny in {city} for {days} days"

    async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="test", max_retries=0) as sdk:
        agent = Agent(name="weather", model=OpenAIResponsesModel(model=MODEL, openai_client=sdk), tools=[get_weather],
                      tool_use_behavior="stop_on_first_tool", model_settings=ModelSettings(
                          tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=1))
        result = await Runner.run(agent, "Weather in Paris?")
    assert len(called) == 1 and result.final_output == "sunny in {} for {} days".format(*called[0])


async def test_agents_sdk_structured_output_type(server):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="test", max_retries=0) as sdk:
        agent = Agent(name="forecaster", model=OpenAIResponsesModel(model=MODEL, openai_client=sdk),
                      output_type=Forecast,
                      model_settings=ModelSettings(max_tokens=200, temperature=1, extra_body={"seed": 1}))
        result = await Runner.run(agent, "Forecast for Paris")
    assert isinstance(result.final_output, Forecast)


@pytest.mark.parametrize("body, status, param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"input": "hi", "tools": [TOOL, {"type": "web_search"}]}, 400, "tools[1].type"),
    ({"input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "absent"}}, 400, "tool_choice.name"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, 400, "text.format.schema"),  # refused by the replica
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}, 400,
     "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, 400, "input[0].call_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input[0].type"),
    ({"input": 7}, 400, "input"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x" * 10**6}, 400, "input"),
])
def test_bad_requests_are_openai_errors(server, body, status, param):
    r = requests.post(f"{server}/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, r.text
    assert_valid(r.json(), "ErrorResponse")
    if param is not None:
        assert r.json()["error"]["param"] == param


def test_nothing_is_stored(server, client):
    r = requests.get(f"{server}/v1/responses/resp_abc", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_abc")
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="demo-whisper", input="hi")
    assert info.value.body["code"] == "model_task_mismatch"


def test_tokenize_counts_what_generation_sees(server, client):
    prompt = "Paris is the capital of"
    tok = requests.post(f"{server}/tokenize", json={"model": MODEL, "prompt": prompt, "return_token_strs": True},
                        timeout=30).json()
    assert tok["max_model_len"] == CONTEXT and len(tok["token_strs"]) == tok["count"] == len(tok["tokens"])
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert completion.usage.prompt_tokens == tok["count"]
    messages = [{"role": "user", "content": prompt}]
    chat_tok = requests.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}, timeout=30).json()
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == chat_tok["count"]
    back = requests.post(f"{server}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}, timeout=30).json()
    assert back == {"prompt": prompt}
    tool_history = [{"role": "assistant", "content": "x", "tool_calls": [{}]}]  # as chat: refused (found by fuzzing)
    for route, body in [("tokenize", {"prompt": "a", "messages": messages}), ("tokenize", {}),
                        ("tokenize", {"messages": tool_history}),
                        ("detokenize", {"tokens": [10**7]}), ("detokenize", {"tokens": "1"})]:
        r = requests.post(f"{server}/{route}", json={"model": MODEL, **body}, timeout=30)
        assert r.status_code == 400 and "error" in r.json(), (route, body, r.text)
    r = requests.post(f"{server}/tokenize", json={"model": "demo-whisper", "prompt": "a"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_task_mismatch"


def test_models_list_tasks_and_context(server):
    cards = {m["id"]: m for m in requests.get(f"{server}/v1/models", timeout=30).json()["data"]}
    assert cards[MODEL]["task"] == "chat" and cards[MODEL]["max_model_len"] == CONTEXT
    assert cards["demo-whisper"]["task"] == "transcription" and "max_model_len" not in cards["demo-whisper"]
    assert (cards["all-MiniLM-L6-v2"]["task"], cards["all-MiniLM-L6-v2"]["max_model_len"]) == ("embedding", 256)
    assert cards["demo-fill-mask"]["task"] == "fill-mask" and cards["demo-fill-mask"]["max_model_len"] == 128
    assert cards["demo-chat-s1"]["task"] == "chat"
    one = requests.get(f"{server}/v1/models/{MODEL}", timeout=30).json()
    assert_valid(one, "Model")
    assert one["task"] == "chat" and one["max_model_len"] == CONTEXT
