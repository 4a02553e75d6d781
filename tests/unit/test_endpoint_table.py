"""The ingress's one request path, driven through a toy endpoint and a fake deployment handle (no Ray).

The toy shows what a new endpoint costs: a wire model (the protocol module), a ``Serving`` subclass (the
serving module) and one ``Endpoint`` row; the ingress's lookup, validation, streaming and error handling
come with the row.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from app.config import ChatModelSpec
from app.ingress import Endpoint
from app.protocol.common import WireModel
from app.serving.base import Serving
from tests.unit.fake_ingress import ingress_app


# -- the toy endpoint: protocol, serving, row ------------------------------------------------------------

class ShoutRequest(WireModel):
    model: str
    text: str = Field(max_length=100)
    stream: bool = False


class ShoutChunk(BaseModel):
    piece: str


class ShoutResponse(BaseModel):
    text: str


class ShoutServing(Serving):
    task, method, request_model = "chat", "shout", ShoutRequest

    async def chunks(self, records: AsyncIterator[list[str]], body: ShoutRequest):
        async for batch in records:
            for piece in batch:
                yield ShoutChunk(piece=piece)

    async def collect(self, chunks, body: ShoutRequest) -> ShoutResponse:
        return ShoutResponse(text="".join([c.piece async for c in chunks]))


ROW = Endpoint("/v1/shout", ShoutServing(), "Shout the text back")


# -- a fake deployment and an ingress without Ray ----------------------------------------------------------

class FakeCall:
    """What ``handle.options(stream=True).<method>.remote(...)`` returns: records, and cancel()."""

    def __init__(self, records: list[list[str]]) -> None:
        self._records, self.cancelled = iter(records), False

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[str]:
        try:
            return next(self._records)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def options(self, **_: Any) -> "FakeHandle":
        return self

    def __getattr__(self, method: str):
        handle = self

        class Method:
            def remote(self, body):
                handle.calls.append((method, body))
                return FakeCall([[w.upper()] for w in body.text.split()])

        return Method()


@pytest.fixture
def client():
    handle = FakeHandle()
    app = ingress_app(ROW, [ChatModelSpec(id="m", source="unused")], {"m": handle})
    with TestClient(app) as c:
        c.handle = handle
        yield c


def test_a_toy_endpoint_is_a_protocol_model_a_serving_class_and_one_row(client):
    r = client.post("/v1/shout", json={"model": "m", "text": "one request path"})
    assert r.status_code == 200 and r.json() == {"text": "ONEREQUESTPATH"}
    assert client.handle.calls[0][0] == "shout" and isinstance(client.handle.calls[0][1], ShoutRequest)


def test_the_row_streams_through_the_same_path(client):
    r = client.post("/v1/shout", json={"model": "m", "text": "a b", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text == 'data: {"piece": "A"}\n\ndata: {"piece": "B"}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize("body,status,code,param", [
    ({"model": "nope", "text": 5}, 404, "model_not_found", "model"),  # the model first, whatever else
    ({"model": "m", "text": "x" * 101}, 400, None, "text"),
    ({"text": "hi"}, 400, None, "model"),
])
def test_the_row_gets_the_shared_lookup_and_validation(client, body, status, code, param):
    r = client.post("/v1/shout", json=body)
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param
    assert code is None or error["code"] == code
    assert not client.handle.calls
