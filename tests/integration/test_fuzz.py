"""Fuzz the chat and models routes from the app's own OpenAPI schema (schemathesis + hypothesis).

The schema is the FastAPI-generated ``GET /openapi.json`` of the running test server. Schemathesis
generates valid and invalid requests (its coverage phase: boundary values of every field; then a bounded,
derandomized hypothesis phase). Every answer must be:

- not a 5xx;
- an error: a JSON body valid as the official OpenAI ``ErrorResponse``;
- a 200: valid as the OpenAI response of the route; a streamed chat answer is SSE whose every ``data:``
  event is a valid ``CreateChatCompletionStreamResponse`` (or an error body) and which ends with
  ``data: [DONE]``.

Generated ``max_tokens`` values that the server would accept are capped (see :func:`_bounded`) so that the
whole test stays within about a minute on 2 CPUs; invalid values go through untouched.
"""

from __future__ import annotations

import json
import zlib

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from tests.openapi_schema import assert_valid

MODEL = "demo-chat"
ROUTES = r"^/v1/(chat/completions|models(/\{model\})?)$"
MAX_TOKENS_CAP = 8           # generation bound of an accepted request (the server's own limit is 512)
MAX_EXAMPLES = 80            # per operation, for the hypothesis (fuzzing) phase
TIMEOUT_S = 60               # per request: far above the slowest legitimate answer here


@pytest.fixture(scope="session")
def app_schema(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    schema.config.update(base_url=server, request_timeout=TIMEOUT_S)
    schema.config.max_stream_events = 10_000  # read whole event streams (schemathesis keeps 20 by default)
    schema.config.generation.update(modes=["positive", "negative"], deterministic=True, database="none",
                                    allow_x00=False, max_examples=MAX_EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("app_schema").include(path_regex=ROUTES)


def _steer(body, positive: bool):
    """Make generated chat bodies reach the model often enough, and keep them cheap.

    The FastAPI schema cannot say that ``model`` must name a served model or that only an assistant
    message may omit ``content``, so schema-valid (positive) bodies would almost all be 404s and 400s:
    those get ``model = MODEL`` (but for one body in five, which keeps unknown-model coverage) and content
    where it is required, and one in three is streamed. The choices hash the body, so they are as
    reproducible as the bodies themselves. Any body gets its accepted generation lengths (1..512) capped at
    MAX_TOKENS_CAP; invalid values go through untouched.
    """
    if not isinstance(body, dict):
        return body
    if positive:
        fingerprint = zlib.crc32(repr(sorted(body.items(), key=lambda kv: kv[0])).encode())
        if fingerprint % 5:
            body["model"] = MODEL
        if fingerprint % 3 == 0:
            body["stream"] = True  # generated bodies rarely stream; the SSE path deserves its share
        for message in body.get("messages") or []:
            if isinstance(message, dict) and message.get("role") != "assistant" and message.get("content") is None:
                message["content"] = "hi"
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and MAX_TOKENS_CAP < value <= 512:
            body[key] = MAX_TOKENS_CAP
    return body


def _check_stream(text: str) -> None:
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events, "empty event stream"
    for block in events[:-1]:
        assert block.startswith("data: "), block[:200]
        payload = json.loads(block[len("data: "):])
        if "error" in payload:
            assert_valid(payload, "ErrorResponse")
        else:
            assert_valid(payload, "CreateChatCompletionStreamResponse")
    assert events[-1] == "data: [DONE]", events[-1][:200]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_chat_and_models(case):
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if case.operation.path == "/v1/chat/completions":
        case.body = _steer(case.body, positive)
    elif case.operation.path == "/v1/models/{model}" and positive and len(case.path_parameters["model"]) % 2:
        case.path_parameters["model"] = MODEL  # else every lookup is a 404
    response = case.call(timeout=TIMEOUT_S)
    where = f"{case.method} {case.formatted_path} body={str(case.body)[:500]!r} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:500]}"
    ctype = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200:
        assert ctype.startswith("application/json"), f"{where}: {ctype} {response.text[:300]}"
        assert_valid(response.json(), "ErrorResponse")
        return
    if case.operation.path == "/v1/models":
        assert_valid(response.json(), "ListModelsResponse")
    elif case.operation.path == "/v1/models/{model}":
        assert_valid(response.json(), "Model")
    elif ctype.startswith("text/event-stream"):
        assert not response.stream_cut_short, where
        _check_stream(response.text)
    else:
        assert ctype.startswith("application/json"), f"{where}: {ctype}"
        assert_valid(response.json(), "CreateChatCompletionResponse")


# Found by the fuzz test (regressions): a positive temperature, top_p or repetition_penalty below float32's
# range used to become 0 / inf / NaN in the sampling math and fail the whole running batch with a 500.
# Now a tiny temperature means greedy, top_p always keeps the likeliest token, repetition_penalty has a
# floor of 0.01 (400 below it), and a row whose sampling fails fails alone.
TINY = [("temperature", 1e-40), ("top_p", 1e-46), ("repetition_penalty", 1e-40)]


@pytest.mark.parametrize(("param", "value"), TINY, ids=[p for p, _ in TINY])
def test_tiny_sampling_value_is_not_a_500(server, param, value):
    r = requests.post(f"{server}/v1/chat/completions", timeout=TIMEOUT_S, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1,
        param: value})
    assert r.status_code < 500, f"{param}={value!r} -> {r.status_code} {r.text[:300]}"


async def test_a_bad_request_does_not_fail_its_batch_neighbours(server):
    url = f"{server}/v1/chat/completions"
    innocent = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "temperature": 0, "stream": True}
    bad = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
           "temperature": 1e-40}
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        async with http.stream("POST", url, json=innocent) as stream:
            assert stream.status_code == 200
            lines = aiter(stream.aiter_lines())
            first = await anext(lines)  # the innocent request is in the running batch now
            await http.post(url, json=bad)
            events = [first] + [line async for line in lines]
    errors = [e for e in events if e.startswith("data: {") and '"error"' in e]
    assert not errors, f"the innocent neighbour's stream failed: {errors[0][:300]}"
