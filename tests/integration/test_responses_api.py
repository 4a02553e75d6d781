"""``/v1/responses`` over real HTTP, the `openai` SDK and the OpenAI Agents SDK against the session's Ray
Serve: the documented event sequence, each event valid against the spec, and the same answer as the chat
request it maps onto."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.openapi_schema import assert_valid, assert_valid_event

MODEL = "demo-chat"
# The demo model answers this prompt greedily with an end of turn after 18 tokens (a complete answer).
BRIEF = "me story"


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


@pytest.mark.parametrize("body, status, param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tools"),
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, None),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, 400, None),
    ({"input": 7}, 400, "input"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x" * 10**6}, 400, "messages"),
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
    assert tok["max_model_len"] == 256 and len(tok["token_strs"]) == tok["count"] == len(tok["tokens"])
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
    assert cards[MODEL]["task"] == "chat" and cards[MODEL]["max_model_len"] == 256
    assert cards["demo-whisper"]["task"] == "transcription" and "max_model_len" not in cards["demo-whisper"]
    assert (cards["all-MiniLM-L6-v2"]["task"], cards["all-MiniLM-L6-v2"]["max_model_len"]) == ("embedding", 256)
    assert cards["demo-fill-mask"]["task"] == "fill-mask" and cards["demo-fill-mask"]["max_model_len"] == 128
    assert cards["demo-chat-s1"]["task"] == "chat"
    one = requests.get(f"{server}/v1/models/{MODEL}", timeout=30).json()
    assert_valid(one, "Model")
    assert one["task"] == "chat" and one["max_model_len"] == 256
