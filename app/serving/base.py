"""What an endpoint family provides to the ingress's one request path.

A :class:`Serving` turns one HTTP request into one streaming call of a model deployment and the
deployment's records back into an answer. The ingress (``app/ingress.py``) drives every endpoint the same
way::

    inbound = await serving.read(request)          # raw payload and the requested model name
    spec    = lookup(inbound.model, serving.task)  # 404 for an unknown model, whatever else the body holds
    body    = await serving.validate(inbound, spec)
    await serving.screen(body, inbound, spec, deployment)  # cheap refusals before the body travels
    records = deployment.<serving.method>(*await serving.args(body, inbound, spec))  # streamed over Ray
    respond(serving.chunks(records, body), stream=serving.streams(body), ...)

Streamed, each chunk goes out as an SSE event (``dump``); not streamed, ``collect`` folds the same chunks
and ``render`` writes the body: one path for both. The defaults here serve a JSON request body validated
by ``request_model``; subclasses override what differs (a multipart form, a non-JSON rendering).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from app.config import ImageFetchSpec
from app.errors import BodyTimedOut, InvalidRequest, validation_error
from app.protocol.common import INVALID_UNICODE, lone_surrogate_at

# Bodies above this many bytes are parsed and validated on a worker thread: a 30 MB JSON document takes
# long enough to stall every stream the ingress is serving.
OFF_LOOP_BYTES = 256 * 1024
DEFAULT_BODY_TIMEOUT_S = 60.0  # IngressSpec.body_timeout_s's default, for an app without settings


@dataclass
class Inbound:
    """A request as read, before validation: the model it names and its raw fields."""

    model: str
    payload: dict[str, Any]
    size: int = 0  # bytes of the body, to decide whether validation leaves the event loop
    files: dict[str, Any] = field(default_factory=dict)  # multipart uploads, by field name
    # Where its image_url parts may point (the ingress's IngressSpec.images; app/images.py applies it).
    images: ImageFetchSpec = field(default_factory=ImageFetchSpec)


class Serving:
    """Base of the endpoint families' serving objects (see the module docstring)."""

    task: ClassVar[str]  # the task a model must serve to be used here
    method: ClassVar[str]  # the deployment's streaming method
    request_model: ClassVar[type[BaseModel]]  # validates the payload; documents the route in OpenAPI

    async def read(self, request: Request) -> Inbound:
        """The JSON body, parsed (off the event loop when large), its ``model``, and the ingress's image
        policy (``request.app.state.settings.images`` when the app has settings, else the default)."""
        raw = await within_body_timeout(request, request.body())
        try:
            payload = await maybe_off_loop(len(raw), json.loads, raw)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}.",
                                 code="invalid_json") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
        return Inbound(model=model_name(payload.get("model")), payload=payload, size=len(raw),
                       images=image_policy(request))

    async def validate(self, inbound: Inbound, spec: Any) -> BaseModel:
        """The payload as ``request_model``; InvalidRequest (400) names the first bad field."""
        try:
            return await maybe_off_loop(inbound.size, self.request_model.model_validate, inbound.payload)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    async def screen(self, body: Any, inbound: Inbound, spec: Any, deployment: Any) -> None:
        """Refuse, by raising a ServingError, what the model would refuse anyway and is costly to send
        it (``deployment`` is the model's handle, to ask it for its limits). Default: nothing."""

    async def args(self, body: Any, inbound: Inbound, spec: Any) -> tuple:
        """Positional arguments of the deployment method."""
        return (body,)

    def streams(self, body: Any) -> bool:
        return bool(getattr(body, "stream", False))

    def chunks(self, records: AsyncIterator[list[Any]], body: Any) -> AsyncIterator[BaseModel]:
        raise NotImplementedError

    async def collect(self, chunks: AsyncIterator[BaseModel], body: Any) -> Any:
        raise NotImplementedError

    def dump(self, chunk: BaseModel, body: Any) -> dict[str, Any]:
        return chunk.model_dump()

    def render(self, collected: Any, body: Any) -> Response:
        return JSONResponse(collected.model_dump())

    def openapi(self) -> dict[str, Any]:
        """The route's OpenAPI ``requestBody`` (schemas referenced from ``components``)."""
        return {"required": True, "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{self.request_model.__name__}"}}}}


async def within_body_timeout(request: Request, reading: Any) -> Any:
    """``await reading`` (the request's body or form), or BodyTimedOut (408) past the ingress's
    ``body_timeout_s``: a client that trickles its body must not hold a connection and a request slot for
    as long as it likes (HAProxy's own timeout closes only a silent connection)."""
    settings = getattr(request.app.state, "settings", None)
    timeout = getattr(settings, "body_timeout_s", None) or DEFAULT_BODY_TIMEOUT_S
    try:
        return await asyncio.wait_for(reading, timeout)
    except asyncio.TimeoutError:
        raise BodyTimedOut(f"The request body did not arrive within {timeout:g} s "
                           "(ingress.body_timeout_s).") from None


def image_policy(request: Request) -> ImageFetchSpec:
    """The image policy of the app serving ``request`` (its ``state.settings``, an IngressSpec)."""
    settings = getattr(request.app.state, "settings", None)
    policy = getattr(settings, "images", None)
    return policy if isinstance(policy, ImageFetchSpec) else ImageFetchSpec()


def model_name(value: Any) -> str:
    """The request's ``model`` field, checked before anything else in the body."""
    if value is None or value == "":
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(value, str):
        raise InvalidRequest("Invalid value for 'model': expected a string.", param="model")
    if lone_surrogate_at(value) is not None:
        raise InvalidRequest("Invalid value for 'model': the text is not valid Unicode (a lone surrogate).",
                             param="model", code=INVALID_UNICODE)
    return value


async def maybe_off_loop(size: int, fn, *args):
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
