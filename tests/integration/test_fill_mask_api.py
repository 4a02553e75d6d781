"""``POST /models/{model}`` (fill-mask) against the session's real Ray Serve, called the way Hugging Face's
``InferenceClient`` calls it and the way ``curl -d`` does; the oracle is ``transformers.pipeline`` on the
same demo checkpoint, run locally."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.config import IngressSpec
from app.protocol.pipeline import FillMaskOutputElement
from deployments.models.bert_demo import FILL_MASK_DEMO
from tests.openapi_schema import assert_valid

pytestmark = pytest.mark.integration

MODEL = "demo-fill-mask"
TEXT = "Paris is the [MASK] of France."
TEXTS = [TEXT, "The quick brown [MASK] jumps over the lazy dog.", "Hello [MASK], how are you today?",
         "a [MASK] b [MASK] c", "Ray Serve runs [MASK] as replicas.", "one two [MASK] four five six seven"]
SCORE_TOL = 1e-5


@pytest.fixture(scope="module")
def url(server) -> str:
    return f"{server}/models/{MODEL}"


@pytest.fixture(scope="module")
def oracle():
    from transformers import pipeline

    from deployments.models.sources import resolve_source

    return pipeline("fill-mask", model=str(resolve_source("demo:fill-mask")), device="cpu")


def assert_same(got, expected) -> None:
    """Same shape, tokens, token strings and sequences; scores within SCORE_TOL."""
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (got, expected)
        for g, e in zip(got, expected):
            assert_same(g, e)
        return
    got = dict(got)
    FillMaskOutputElement.model_validate(got)
    assert {k: got[k] for k in ("token", "token_str", "sequence")} == \
        {k: expected[k] for k in ("token", "token_str", "sequence")}
    assert got["score"] == pytest.approx(expected["score"], abs=SCORE_TOL)


def elements(out) -> list[dict]:
    from huggingface_hub import FillMaskOutputElement as HubElement

    assert all(isinstance(o, HubElement) for o in out)
    return [{"score": o.score, "token": o.token, "token_str": o.token_str, "sequence": o.sequence} for o in out]


def test_inference_client_fill_mask_equals_the_local_pipeline(url, oracle):
    from huggingface_hub import InferenceClient

    assert_same(elements(InferenceClient(model=url, timeout=60).fill_mask(TEXT)), oracle(TEXT))
    # base_url is the client's alias of model; a URL per call works the same
    assert_same(elements(InferenceClient(base_url=url, timeout=60).fill_mask(TEXT, top_k=2)),
                oracle(TEXT, top_k=2))
    targets = ["capital", "Paris", "france", "robot"]
    assert_same(elements(InferenceClient(timeout=60).fill_mask(TEXT, model=url, targets=targets, top_k=3)),
                oracle(TEXT, targets=targets, top_k=3))


async def test_the_async_inference_client_too(url, oracle):
    from huggingface_hub import AsyncInferenceClient

    async with AsyncInferenceClient(model=url, timeout=60) as client:
        assert_same(elements(await client.fill_mask(TEXTS[1], top_k=7)), oracle(TEXTS[1], top_k=7))


def test_a_plain_text_body_as_curl_sends_it(url, oracle):
    r = requests.post(url, data=TEXT, timeout=60)  # like curl -X POST -d "Paris is the [MASK] of France."
    assert r.status_code == 200, r.text
    assert_same(r.json(), oracle(TEXT))
    r = requests.post(url, data=TEXT, headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert_same(r.json(), oracle(TEXT))


@pytest.mark.parametrize("parameters", [{"top_k": 1}, {"top_k": 25}, {"targets": "robot"},
                                        {"targets": ["one", "two", "Three", "zzzz"], "top_k": 2}],
                         ids=["top1", "top25", "one-target", "targets"])
def test_parameters_are_honoured(url, oracle, parameters):
    r = requests.post(url, json={"inputs": TEXTS, "parameters": parameters}, timeout=60)
    assert r.status_code == 200, r.text
    assert_same(r.json(), oracle(TEXTS, **parameters))  # several masks in a text: a list per mask


def engine_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle(MODEL, app_name="openai").stats.remote().result()


def test_eight_concurrent_requests_equal_each_alone_and_share_passes(url):
    bodies = [{"inputs": TEXTS[i % len(TEXTS)], "parameters": {"top_k": 3 + i}} for i in range(8)]
    bodies[5]["inputs"] = TEXTS[:3]
    alone = [requests.post(url, json=b, timeout=60).json() for b in bodies]
    before = engine_stats()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: requests.post(url, json=b, timeout=60), bodies))
    after = engine_stats()
    for r, a in zip(together, alone):
        assert r.status_code == 200, r.text
        assert_same(r.json(), a)
    assert after["texts"] - before["texts"] == 10
    assert after["forwards"] - before["forwards"] < 8  # batched: fewer passes than requests


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert_valid(r.json(), "ErrorResponse")
    return r.json()["error"]


def test_a_text_without_the_mask_token_is_a_400_naming_it(url):
    for body in ({"inputs": "Paris is the capital of France."}, {"inputs": ""}):
        err = error(requests.post(url, json=body, timeout=60), 400)
        assert "No mask token ([MASK]) found in the input" in err["message"] and err["param"] == "inputs"
    err = error(requests.post(url, json={"inputs": [TEXT, "no mask"]}, timeout=60), 400)
    assert "at inputs[1]" in err["message"] and err["param"] == "inputs[1]" and err["code"] == "no_mask_token"
    assert error(requests.post(url, data="", timeout=60), 400)["param"] == "inputs"  # empty body = empty text


def test_a_text_too_long_is_a_400_with_the_counts(url):
    err = error(requests.post(url, json={"inputs": "[MASK] " + "one " * 500}, timeout=60), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "inputs"
    assert f"maximum input length is {FILL_MASK_DEMO.max_positions} tokens" in err["message"]
    assert "has 503 tokens" in err["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"inputs": 5}, "inputs"), ({"inputs": [TEXT, None]}, "inputs[1]"), ({"inputs": []}, "inputs"),
    ({"inputs": TEXT, "parameters": {"top_k": "many"}}, "parameters.top_k"),
    ({"inputs": TEXT, "parameters": {"top_k": 101}}, "parameters.top_k"),  # above limits.max_top_k
    ({"inputs": TEXT, "parameters": {"targets": [3]}}, "parameters.targets[0]"),
    ({"inputs": TEXT, "parameters": {"targets": ["   "]}}, "parameters.targets"),  # no token at all
    ({"inputs": [TEXT] * 17}, "inputs"),  # above limits.max_inputs (16 in tests/conftest.py)
])
def test_bad_values_are_400s_naming_the_param(url, body, param):
    assert error(requests.post(url, json=body, timeout=60), 400)["param"] == param


def test_other_models_bodies_and_methods(server, url):
    chat = error(requests.post(f"{server}/models/demo-chat", data=TEXT, timeout=60), 404)
    assert chat["code"] == "model_task_mismatch"
    assert error(requests.post(f"{server}/models/no/such-model", data=TEXT, timeout=60), 404)["code"] == \
        "model_not_found"
    assert error(requests.get(url, timeout=60), 405)["code"] == "method_not_allowed"
    assert requests.get(f"{server}/v1/models/{MODEL}", timeout=60).json()["id"] == MODEL  # no collision
    huge = b"[MASK] " + b"x" * IngressSpec().max_request_body_bytes
    assert error(requests.post(url, data=huge, timeout=60), 413)["code"] == "request_too_large"
