"""Fuzz the chat, embeddings, fill-mask and models routes from the app's own OpenAPI schema
(schemathesis + hypothesis).

The schema is the FastAPI-generated ``GET /openapi.json`` of the running test server. Schemathesis
generates valid and invalid requests (its coverage phase: boundary values of every field; then a bounded,
derandomized hypothesis phase). Every answer must be:

- not a 5xx;
- an error: a JSON body valid as the official OpenAI ``ErrorResponse``;
- a 200: valid as the OpenAI response of the route (fill-mask, which OpenAI lacks: the pipeline's
  lists of ``FillMaskOutputElement``); a streamed chat answer is SSE whose every ``data:``
  event is a valid ``CreateChatCompletionStreamResponse`` (or an error body) and which ends with
  ``data: [DONE]``.

Generated ``max_tokens`` values that the server would accept are capped (see :func:`_bounded`) so that the
whole test stays within about a minute on 2 CPUs; invalid values go through untouched.
"""

from __future__ import annotations

import base64
import json
import zlib

import httpx
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from app.protocol.pipeline import FillMaskOutputElement
from app.protocol.tokenize import DetokenizeResponse, TokenizeResponse
from tests.openapi_schema import assert_valid, assert_valid_event

MODEL = "demo-chat"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
FILL_MASK_MODEL = "demo-fill-mask"
ROUTES = (r"^(/v1/(chat/completions|completions|responses|embeddings|models(/\{model\})?)|/models/\{model\}"
          r"|/(de)?tokenize)$")
GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize")
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
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if type(value) is int and MAX_TOKENS_CAP < value <= 512:
            body[key] = MAX_TOKENS_CAP
    if positive and isinstance(body.get("prompt"), list):  # completions: a few prompts, a few choices each
        body["prompt"] = body["prompt"][:4]
        if type(body.get("n")) is int:
            body["n"] = min(body["n"], 2)
    return body


def _steer_embeddings(body, positive: bool):
    """Schema-valid embeddings bodies name the served embedding model (but for one in five)."""
    if positive and isinstance(body, dict):
        if zlib.crc32(repr(sorted(body.items(), key=lambda kv: kv[0])).encode()) % 5:
            body["model"] = EMBEDDING_MODEL
    return body


def _steer_fill_mask(case, positive: bool) -> None:
    """Schema-valid pipeline requests name the fill-mask model (but for one in five) and hold its mask
    token in every text, else nearly all of them would be 404s and 400s."""
    if not positive:
        return
    if zlib.crc32(repr(case.body).encode()) % 5:
        case.path_parameters["model"] = FILL_MASK_MODEL
    if isinstance(case.body, str):
        case.body += " [MASK]"
    elif isinstance(case.body, dict) and isinstance(case.body.get("inputs"), str):
        case.body["inputs"] += " [MASK]"
    elif isinstance(case.body, dict) and isinstance(case.body.get("inputs"), list):
        case.body["inputs"] = [f"{t} [MASK]" if isinstance(t, str) else t for t in case.body["inputs"]]


def _check_fill_mask(value) -> None:
    """A fill-mask answer: candidates, or a list of them per mask and/or per text (the pipeline's shapes)."""
    assert isinstance(value, list) and value, value
    for item in value:
        if isinstance(item, list):
            _check_fill_mask(item)
        else:
            FillMaskOutputElement.model_validate(item)


def _decoded(body: dict) -> dict:
    """A base64 embeddings answer with its vectors decoded (the spec only describes float lists)."""
    data = [{**d, "embedding": np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()}
            if isinstance(d.get("embedding"), str) else d for d in body.get("data", [])]
    return {**body, "data": data}


def _completion_chunk(payload: dict) -> None:
    """A streamed completion is the completion object with finish_reason null until a choice ends."""
    choices = [{**c, "finish_reason": c.get("finish_reason") or "stop"} for c in payload.get("choices", [])]
    assert_valid({**payload, "choices": choices}, "CreateCompletionResponse")


# How one SSE event of each streaming route is checked.
STREAM_EVENTS = {
    "/v1/chat/completions": lambda p: assert_valid(p, "CreateChatCompletionStreamResponse"),
    "/v1/completions": _completion_chunk,
    "/v1/responses": assert_valid_event,
}
# How a 200 JSON body of each route is checked (fill-mask and tokenize have no OpenAI schema).
BODIES = {
    "/v1/models": lambda b: assert_valid(b, "ListModelsResponse"),
    "/v1/models/{model}": lambda b: assert_valid(b, "Model"),
    "/models/{model}": lambda b: _check_fill_mask(b),
    "/v1/embeddings": lambda b: assert_valid(_decoded(b), "CreateEmbeddingResponse"),
    "/v1/chat/completions": lambda b: assert_valid(b, "CreateChatCompletionResponse"),
    "/v1/completions": lambda b: assert_valid(b, "CreateCompletionResponse"),
    "/v1/responses": lambda b: assert_valid(b, "Response"),
    "/tokenize": lambda b: TokenizeResponse.model_validate(b),
    "/detokenize": lambda b: DetokenizeResponse.model_validate(b),
}


def _check_stream(text: str, path: str) -> None:
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events, "empty event stream"
    for block in events[:-1]:
        assert block.startswith("data: "), block[:200]
        payload = json.loads(block[len("data: "):])
        if "error" in payload:
            assert_valid(payload, "ErrorResponse")
        else:
            STREAM_EVENTS[path](payload)
    assert events[-1] == "data: [DONE]", events[-1][:200]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_chat_and_models(case):
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if case.operation.path in GENERATION:
        case.body = _steer(case.body, positive)
    elif case.operation.path == "/v1/embeddings":
        case.body = _steer_embeddings(case.body, positive)
    elif case.operation.path == "/models/{model}":
        _steer_fill_mask(case, positive)
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
    if ctype.startswith("text/event-stream"):
        assert not response.stream_cut_short, where
        _check_stream(response.text, case.operation.path)
    else:
        assert ctype.startswith("application/json"), f"{where}: {ctype}"
        BODIES[case.operation.path](response.json())


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


def _encoded(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", **kwargs) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size).save(out, fmt, **kwargs)
    return out.getvalue()


def _image_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


# Hostile image parts (tests/integration/test_vision_api.py has the ordinary refusals): each must be a 400
# naming the part, quickly, and must not disturb a stream already running on the same replica.
HOSTILE_IMAGES = {
    "pixel bomb": _image_url(_encoded((30000, 30000), "1")),                   # ~100 KB PNG, 900 Mpixels
    "gif bomb": _image_url(_encoded((20000, 20000), "1", "GIF"), "gif"),
    "aspect ratio": _image_url(_encoded((1, 4000))),                          # the processor refuses it
    "svg": _image_url(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "svg+xml"),
    "empty": "data:image/png;base64,",
    "not base64": "data:image/png;base64,%%%%",
    "truncated": _image_url(_encoded((64, 64))[:40]),
    "zip": _image_url(zlib.compress(b"\0" * 100_000)),
    "javascript": "data:image/png;base64," + "A" * 10 + "',alert(1),'",
    "remote not allowed": "https://169.254.169.254/latest/meta-data.png",
    "file outside root": "file:///proc/self/environ",
    "no host": "http:///x.png",
}
VLM_MODEL = "demo-vlm"


async def test_hostile_images_are_400s_and_do_not_fail_a_running_stream(server):
    url = f"{server}/v1/chat/completions"
    innocent = {"model": VLM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "temperature": 0, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        async with http.stream("POST", url, json=innocent) as stream:
            assert stream.status_code == 200
            lines = aiter(stream.aiter_lines())
            first = await anext(lines)  # the innocent request is in the running batch now
            for name, image in HOSTILE_IMAGES.items():
                for model in (VLM_MODEL, MODEL):  # MODEL is text-only: refused with or without a good image
                    body = {"model": model, "max_tokens": 4, "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "look"},
                                                     {"type": "image_url", "image_url": {"url": image}}]}]}
                    r = await http.post(url, json=body)
                    assert r.status_code == 400, f"{name} on {model}: {r.status_code} {r.text[:300]}"
                    assert_valid(r.json(), "ErrorResponse")
                    assert r.json()["error"]["param"] == "messages[0].content[1]", (name, model, r.text[:300])
            events = [e for e in [first] + [line async for line in lines] if e]
    errors = [e for e in events if e.startswith("data: {") and '"error"' in e]
    assert not errors, f"the innocent stream failed: {errors[0][:300]}"
    assert events[-1] == "data: [DONE]"
