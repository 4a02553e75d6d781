"""Pipeline tasks on the ingress side (the Hugging Face Inference API shape); :data:`PIPELINE` is the route
table's serving object of ``POST /models/{model}``.

The model is the URL's (``/models/google-bert/bert-base-uncased`` names ``google-bert/bert-base-uncased``),
so ``huggingface_hub.InferenceClient(model="http://host:8000/models/<id>").fill_mask(text)`` posts
straight here. The body is ``{"inputs": ..., "parameters": {...}}`` (JSON), or, for a body that is not
a JSON object (``curl -d "Paris is the [MASK] of France."`` sends it form-encoded), the text itself. The
answer is never streamed: it is what ``transformers.pipeline(task)`` returns for the inputs, as JSON (one
text: its answer; several: a list of answers, except that a list of one text answers like the text
alone, as the pipeline does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from app.errors import InvalidRequest, validation_error
from app.protocol.pipeline import REQUESTS, FillMaskRequest
from app.serving.base import Inbound, Serving, maybe_off_loop, model_name, within_body_timeout

# Content types whose body must be a JSON document (any other body that is not a JSON object is text).
_JSON_TYPES = ("application/json",)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


_NOT_JSON = object()


def _parse(raw: bytes) -> Any:
    """The body as JSON, or ``_NOT_JSON``."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _NOT_JSON


def plain(value: Any) -> Any:
    """Records (dataclasses), nested in lists, as JSON-ready dicts and lists."""
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@dataclass
class BodyInbound(Inbound):
    """A request as read: the model from the path, the body still raw (parsed in ``validate``)."""

    body: bytes = b""
    json_type: bool = False  # the content type says JSON: the body must then be a JSON object


@dataclass(frozen=True)
class PipelineResults:
    """The collected answer: one value per input text, in order, and whether the input was a list."""

    values: list[Any]
    batched: bool


class PipelineServing(Serving):
    """``POST /models/{model}``: a pipeline model's ``run`` method."""

    task = "fill-mask"
    method = "run"
    request_model = FillMaskRequest

    async def read(self, request: Request) -> Inbound:
        """The model from the path; the body as a JSON request object or, when it is none, as the text.
        A body that cannot be read is refused in :meth:`validate`, after the model lookup: an unknown
        model is a 404 whatever the body holds, as on every route."""
        model = model_name(request.path_params.get("model"))
        raw = await within_body_timeout(request, request.body())
        return BodyInbound(model=model, payload={}, size=len(raw), body=raw,
                           json_type=_is_json(request.headers.get("content-type", "")))

    async def validate(self, inbound: Inbound, spec: Any) -> BaseModel:
        """The payload as its task's request model, within the model's ``limits``."""
        payload = await self._payload(inbound)
        try:
            body = await maybe_off_loop(inbound.size, REQUESTS[spec.task].model_validate, payload)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        limits = spec.limits
        if len(body.texts()) > limits.max_inputs:
            raise InvalidRequest(f"Too many inputs: {len(body.texts())} texts, more than this model's limit "
                                 f"of {limits.max_inputs} per request.", param="inputs")
        top_k = getattr(body.params, "top_k", None)
        if top_k is not None and top_k > limits.max_top_k:
            raise InvalidRequest(f"Invalid value for 'parameters.top_k': {top_k} is more than this model's "
                                 f"limit of {limits.max_top_k}.", param="parameters.top_k")
        return body

    @staticmethod
    async def _payload(inbound: "BodyInbound") -> dict[str, Any]:
        raw = inbound.body
        if inbound.json_type:
            payload = await maybe_off_loop(len(raw), _parse, raw)
            if payload is _NOT_JSON:
                raise InvalidRequest("We could not parse the JSON body of your request.", code="invalid_json")
            if not isinstance(payload, dict):
                raise InvalidRequest('The request body must be a JSON object: {"inputs": ..., "parameters": '
                                     '{...}}, or the text itself (not JSON).', code="invalid_json")
            return payload
        payload = await maybe_off_loop(len(raw), _parse, raw) if raw[:1024].lstrip()[:1] == b"{" else None
        if isinstance(payload, dict):
            return payload
        try:
            return {"inputs": raw.decode("utf-8")}
        except UnicodeDecodeError:
            raise InvalidRequest("The request body is neither a JSON object nor UTF-8 text.", param="inputs",
                                 code="invalid_unicode") from None

    def streams(self, body: Any) -> bool:
        return False

    async def chunks(self, records: AsyncIterator[list[Any]], body: Any) -> AsyncIterator[Any]:
        async for batch in records:
            for record in batch:
                yield record

    async def collect(self, chunks: AsyncIterator[Any], body: Any) -> PipelineResults:
        by_index = {record.index: plain(record.value) async for record in chunks}
        return PipelineResults(values=[by_index[i] for i in sorted(by_index)],
                               batched=isinstance(body.inputs, list))

    def render(self, collected: PipelineResults, body: Any) -> Response:
        values = collected.values
        # transformers' pipeline answers a list of one text like the text alone.
        return JSONResponse(values if collected.batched and len(values) > 1 else values[0])

    def openapi(self) -> dict[str, Any]:
        schema = {"$ref": f"#/components/schemas/{self.request_model.__name__}"}
        text = {"type": "string", "description": "The input text itself (any body that is not a JSON object)."}
        return {"required": True, "content": {"application/json": {"schema": schema},
                                              "text/plain": {"schema": text}}}


PIPELINE = PipelineServing()
