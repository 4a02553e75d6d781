"""Every error answer of the HTTP layer is an OpenAI ErrorResponse (a small FastAPI app, no Ray)."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.config import IngressSpec
from app.errors import Overloaded, install_error_handlers
from app.middleware import BodySizeLimit
from tests.openapi_schema import assert_valid


class Body(BaseModel):
    temperature: float


@pytest.fixture
def http():
    api = FastAPI()
    install_error_handlers(api)
    api.state.settings = IngressSpec(overload_status=429, retry_after_s=7, max_request_body_bytes=1024)
    api.add_middleware(BodySizeLimit, limit=lambda: api.state.settings.max_request_body_bytes)

    @api.post("/echo")
    async def echo(body: Body):
        return {"ok": body.temperature}

    @api.get("/boom")
    async def boom():
        raise KeyError("secret internal detail")

    @api.get("/busy")
    async def busy():
        raise Overloaded("queue full")

    return TestClient(api, raise_server_exceptions=False)


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert_valid(body, "ErrorResponse")
    return body["error"]


def test_framework_errors_become_openai_errors(http):
    assert error_of(http.get("/nowhere"), 404)["type"] == "invalid_request_error"
    assert error_of(http.get("/echo"), 405)["code"] == "method_not_allowed"
    assert error_of(http.post("/echo", json={"temperature": "hot"}), 400)["param"] == "temperature"
    assert error_of(http.post("/echo", content=b"{oops", headers={"content-type": "application/json"}),
                    400)["code"] == "invalid_json"


def test_unknown_route_names_the_request_and_the_routes(http):
    err = error_of(http.post("/v1/nothing", json={}), 404)
    assert err["code"] == "unknown_route"
    assert "POST /v1/nothing" in err["message"]
    assert "POST /echo" in err["message"] and "GET /boom" in err["message"]  # the routes that exist
    assert "GET /nowhere" in error_of(http.get("/nowhere"), 404)["message"]


def test_wrong_method_is_405_with_allow_header(http):
    resp = http.get("/echo")
    err = error_of(resp, 405)
    assert resp.headers["allow"] == "POST"
    assert "GET" in err["message"] and "/echo" in err["message"] and "POST" in err["message"]


def test_unexpected_error_is_generic_500_without_traceback(http):
    err = error_of(http.get("/boom"), 500)
    assert "secret" not in err["message"] and "Traceback" not in err["message"]
    assert "request id" in err["message"]


def test_overload_status_and_retry_after_follow_settings(http):
    resp = http.get("/busy")
    assert error_of(resp, 429)["type"] == "server_overloaded"
    assert resp.headers["retry-after"] == "7"


def test_body_limit_declared_and_chunked(http):
    big = b'{"temperature": 1, "pad": "' + b"x" * 2000 + b'"}'
    assert error_of(http.post("/echo", content=big, headers={"content-type": "application/json"}),
                    413)["code"] == "request_too_large"

    def chunks():
        for i in range(0, len(big), 256):
            yield big[i:i + 256]

    assert error_of(http.post("/echo", content=chunks(), headers={"content-type": "application/json"}),
                    413)["code"] == "request_too_large"
    assert http.post("/echo", json={"temperature": 1}).json() == {"ok": 1}
