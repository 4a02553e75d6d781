"""``POST /models/{model}`` on the ingress side (the ingress's shared path with a fake deployment, no Ray):
the model from the path, JSON or plain-text bodies, the model's limits, the pipeline's answer shapes."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import ChatModelSpec, FillMaskModelSpec
from app.ingress import ENDPOINTS, api
from app.protocol.pipeline import FillMaskOutputElement, FillMaskRequest
from deployments.engines.pipeline_records import FillMaskPrediction, PipelineResult
from tests.openapi_schema import assert_valid
from tests.unit.fake_ingress import ingress_app
from tests.unit.test_layout import imported_after

ROW = next(e for e in ENDPOINTS if e.path == "/models/{model:exactpath}")
SPECS = [FillMaskModelSpec(id="demo-fill-mask", source="unused", task="fill-mask",
                           limits={"max_inputs": 3, "max_top_k": 10}),
         FillMaskModelSpec(id="google-bert/bert-base-uncased", source="unused", task="fill-mask"),
         ChatModelSpec(id="demo-chat", source="unused")]


def prediction(text: str, n: int) -> FillMaskPrediction:
    return FillMaskPrediction(score=1.0 / (n + 2), token=n, token_str=f"t{n}", sequence=f"{text}/{n}")


class FakeCall:
    def __init__(self, records: list[list[Any]]) -> None:
        self._records = iter(records)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._records)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        pass


class FakePipeline:
    """``run`` answers each text with two candidates (one list per ``[MASK]`` when it has several)."""

    def __init__(self) -> None:
        self.calls: list[FillMaskRequest] = []

    def options(self, **_: Any) -> "FakePipeline":
        return self

    @property
    def run(self):
        fake = self

        class Method:
            def remote(self, body: FillMaskRequest):
                fake.calls.append(body)
                results = []
                for i, text in enumerate(body.texts()):
                    per_mask = [[prediction(text, 2 * m), prediction(text, 2 * m + 1)]
                                for m in range(text.count("[MASK]"))]
                    results.append(PipelineResult(index=i, value=per_mask[0] if len(per_mask) == 1 else per_mask))
                return FakeCall([results[::-1]])  # out of order: the serving sorts by index

        return Method()


@pytest.fixture
def client():
    fake = FakePipeline()
    app = ingress_app(ROW, SPECS, {spec.id: fake for spec in SPECS})

    @app.get("/v1/models/{model:path}")  # the GET route beside it must not collide with the POST one
    async def get_model(model: str):
        return {"id": model}

    with TestClient(app) as c:
        c.fake = fake
        yield c


def candidates(text: str, first: int = 0) -> list[dict]:
    return [FillMaskOutputElement.model_validate(vars(prediction(text, n))).model_dump()
            for n in (first, first + 1)]


def test_the_inference_api_body_and_the_pipeline_answer_shapes(client):
    r = client.post("/models/demo-fill-mask", json={"inputs": "a [MASK]", "parameters": {"top_k": 2}})
    assert r.status_code == 200 and r.json() == candidates("a [MASK]")
    assert client.fake.calls[-1].params.top_k == 2
    r = client.post("/models/demo-fill-mask", json={"inputs": ["a [MASK]", "b [MASK] [MASK]"]})
    assert r.json() == [candidates("a [MASK]"), [candidates("b [MASK] [MASK]"), candidates("b [MASK] [MASK]", 2)]]
    # transformers' pipeline answers a list of one text like the text alone
    assert client.post("/models/demo-fill-mask", json={"inputs": ["a [MASK]"]}).json() == candidates("a [MASK]")


@pytest.mark.parametrize("headers", [{"content-type": "application/x-www-form-urlencoded"},  # curl -d
                                     {"content-type": "text/plain; charset=utf-8"}, {}])
def test_a_body_that_is_not_a_json_object_is_the_text(client, headers):
    text = "Paris is the [MASK] of France. {not json} & café"
    r = client.post("/models/demo-fill-mask", content=text.encode(), headers=headers)
    assert r.status_code == 200, r.text
    assert client.fake.calls[-1].inputs == text and r.json() == candidates(text)


def test_a_json_object_without_a_json_content_type_is_still_a_request(client):
    r = client.post("/models/demo-fill-mask", content=b' {"inputs": "x [MASK]", "parameters": {"top_k": 3}}')
    assert r.status_code == 200 and client.fake.calls[-1].params.top_k == 3


def test_the_model_is_the_rest_of_the_path_slashes_included(client):
    assert client.post("/models/google-bert/bert-base-uncased", content=b"a [MASK]").status_code == 200
    assert client.get("/v1/models/google-bert/bert-base-uncased").json() == {"id": "google-bert/bert-base-uncased"}


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert_valid(r.json(), "ErrorResponse")
    return r.json()["error"]


@pytest.mark.parametrize(("path", "kwargs", "status", "code", "param"), [
    ("/models/nope", {"json": {"inputs": 5}}, 404, "model_not_found", "model"),  # the model first
    ("/models/nope", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 404,
     "model_not_found", "model"),  # whatever the body holds
    ("/models/demo-chat", {"content": b"a [MASK]"}, 404, "model_task_mismatch", "model"),
    ("/models/demo-fill-mask", {"json": {"inputs": 5}}, 400, None, "inputs"),
    ("/models/demo-fill-mask", {"json": {"inputs": []}}, 400, None, "inputs"),
    ("/models/demo-fill-mask", {"json": {"inputs": ["a", 3]}}, 400, None, "inputs[1]"),
    ("/models/demo-fill-mask", {"json": {"inputs": "a", "parameters": {"top_k": "5"}}}, 400, None,
     "parameters.top_k"),
    ("/models/demo-fill-mask", {"json": {"inputs": "a", "parameters": {"top_k": 0}}}, 400, None,
     "parameters.top_k"),
    ("/models/demo-fill-mask", {"json": {"inputs": "a", "parameters": {"top_k": 11}}}, 400, None,
     "parameters.top_k"),  # the model's limits.max_top_k
    ("/models/demo-fill-mask", {"json": {"inputs": ["a"] * 4}}, 400, None, "inputs"),  # limits.max_inputs
    ("/models/demo-fill-mask", {"json": {"inputs": "a", "parameters": {"targets": []}}}, 400, None,
     "parameters.targets"),
    ("/models/demo-fill-mask", {"json": {"parameters": {}}}, 400, None, "inputs"),
    ("/models/demo-fill-mask", {"json": ["a [MASK]"]}, 400, "invalid_json", None),
    ("/models/demo-fill-mask", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400,
     "invalid_json", None),
    ("/models/demo-fill-mask", {"content": b"\xff\xfe [MASK]"}, 400, "invalid_unicode", "inputs"),
    ("/models/", {"content": b"a [MASK]"}, 400, None, "model"),
])
def test_bad_requests_are_openai_errors_naming_the_param(client, path, kwargs, status, code, param):
    err = error(client.post(path, **kwargs), status)
    assert err["param"] == param and (code is None or err["code"] == code), err
    assert not client.fake.calls


def test_other_methods_are_405_and_unknown_paths_404(client):
    err = error(client.get("/models/demo-fill-mask"), 405)
    assert err["code"] == "method_not_allowed" and "POST" in err["message"]
    assert error(client.post("/model/demo-fill-mask", content=b"x"), 404)["code"] == "unknown_route"


def test_the_route_is_documented_with_its_path_parameter_and_both_bodies():
    operation = api.openapi()["paths"]["/models/{model}"]["post"]
    assert [p["name"] for p in operation["parameters"]] == ["model"]
    assert set(operation["requestBody"]["content"]) == {"application/json", "text/plain"}


def test_pipeline_records_import_only_the_standard_library():
    assert not imported_after("import deployments.engines.pipeline_records") & \
        {"torch", "transformers", "tokenizers", "ray", "pydantic", "numpy"}


@pytest.mark.parametrize("module", ["deployments.engines.pipeline", "deployments.engines.pipeline_heads"])
def test_the_pipeline_engine_imports_without_ray(module):
    assert "ray" not in imported_after(f"import {module}")


def test_a_fill_mask_model_spec_and_its_live_user_config():
    from pydantic import ValidationError

    from app.check import check_model_deployment
    from app.config import parse_model_spec

    spec = parse_model_spec({"id": "m", "source": "demo:fill-mask", "task": "fill-mask",
                             "batching": {"max_batch_tokens": 4096}, "limits": {"max_top_k": 20}})
    assert isinstance(spec, FillMaskModelSpec) and spec.batching.max_batch_tokens == 4096
    with pytest.raises(ValidationError, match="audio"):  # another task's field is an error, not ignored
        parse_model_spec({"id": "m", "source": "x", "task": "fill-mask", "audio": {}})
    assert check_model_deployment(spec, {"user_config": {"max_batch_tokens": 512}}, "at") == []
    [problem] = check_model_deployment(spec, {"user_config": {"max_batch_tokens": 0}}, "at")
    assert problem.path == "at.user_config.max_batch_tokens"
