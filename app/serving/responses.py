"""Responses on the ingress side: a ``/v1/responses`` request runs as the chat request it maps onto
(``ResponsesRequest.chat_request``), and the chat model's deltas become the documented event sequence:

``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, then ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut the answer), each numbered by ``sequence_number``.

The first events go out only once the model's first output arrived, so a request the model refuses
still gets its HTTP status. Not streamed, the answer is the last event's ``response``: the collected
stream. :data:`RESPONSES` is the route table's serving object.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, AsyncIterator

from app.protocol.responses import (IncompleteDetails, OutputMessage, OutputText, Response, ResponseEvent,
                                    ResponsesRequest, ResponseUsage)
from app.serving.base import Inbound
from app.serving.generation import GenerationServing


class _Events:
    """Numbers the events of one response and builds them."""

    def __init__(self, body: ResponsesRequest) -> None:
        self.sequence = 0
        self.response = Response(
            id=f"resp_{secrets.token_hex(24)}", created_at=int(time.time()), status="in_progress",
            model=body.model, instructions=body.instructions, temperature=body.temperature, top_p=body.top_p,
            max_output_tokens=body.max_output_tokens, metadata=body.metadata or {}, user=body.user,
            tool_choice="none" if body.tool_choice == "none" else "auto")
        self.item_id = f"msg_{secrets.token_hex(24)}"

    def __call__(self, type_: str, **fields: Any) -> ResponseEvent:
        event = ResponseEvent(type=f"response.{type_}", sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    def snapshot(self) -> Response:
        return self.response.model_copy(deep=True)


async def response_events(records: AsyncIterator[list[Any]], body: ResponsesRequest) -> AsyncIterator[ResponseEvent]:
    """The chat model's deltas (one choice) as the event sequence of the module docstring."""
    ev = _Events(body)
    at = {"item_id": ev.item_id, "output_index": 0, "content_index": 0}
    texts: list[str] = []
    finish, prompt_tokens, output_tokens, started = "stop", 0, 0, False
    async for batch in records:
        if not started:
            started = True
            yield ev("created", response=ev.snapshot())
            yield ev("in_progress", response=ev.snapshot())
            yield ev("output_item.added", output_index=0, item=OutputMessage(id=ev.item_id, status="in_progress",
                                                                             content=[]))
            yield ev("content_part.added", **at, part=OutputText(text=""))
        delta = "".join(d.text for d in batch)
        if delta:
            texts.append(delta)
            yield ev("output_text.delta", **at, delta=delta, logprobs=[])
        for d in batch:
            if d.finish_reason is not None:
                finish, prompt_tokens, output_tokens = d.finish_reason, d.prompt_tokens, d.completion_tokens
    text = "".join(texts)
    complete = finish != "length"
    item = OutputMessage(id=ev.item_id, status="completed" if complete else "incomplete",
                         content=[OutputText(text=text)])
    yield ev("output_text.done", **at, text=text, logprobs=[])
    yield ev("content_part.done", **at, part=OutputText(text=text))
    yield ev("output_item.done", output_index=0, item=item)
    ev.response = ev.response.model_copy(update={
        "status": "completed" if complete else "incomplete", "output": [item],
        "completed_at": int(time.time()) if complete else None,
        "incomplete_details": None if complete else IncompleteDetails(reason="max_output_tokens"),
        "usage": ResponseUsage(input_tokens=prompt_tokens, output_tokens=output_tokens,
                               total_tokens=prompt_tokens + output_tokens)})
    yield ev("completed" if complete else "incomplete", response=ev.snapshot())


class ResponsesServing(GenerationServing):
    """``POST /v1/responses``: the mapped chat request, through a chat model's ``generate`` method."""

    request_model = ResponsesRequest

    def generation_request(self, body: ResponsesRequest) -> Any:
        return body.chat_request()

    async def args(self, body: ResponsesRequest, inbound: Inbound, spec: Any) -> tuple:
        return (body.chat_request(),)

    def chunks(self, records: AsyncIterator[list[Any]], body: ResponsesRequest) -> AsyncIterator[ResponseEvent]:
        return response_events(records, body)

    async def collect(self, chunks: AsyncIterator[ResponseEvent], body: ResponsesRequest) -> Response:
        last = None
        async for event in chunks:
            last = event
        assert last is not None and last.response is not None, "a response stream ends with the response"
        return last.response

    def dump(self, chunk: ResponseEvent, body: ResponsesRequest) -> dict[str, Any]:
        """The event's own fields (the unset ones left out), its ``response`` whole (nulls included)."""
        out = chunk.model_dump(exclude_none=True, exclude={"response"})
        if chunk.response is not None:
            out["response"] = chunk.response.model_dump()
        return out


RESPONSES = ResponsesServing()
