"""Responses on the ingress side: a ``/v1/responses`` request runs as the chat request it maps onto
(``ResponsesRequest.chat_request``), and the chat model's deltas become the documented event sequence:
``response.created``, ``response.in_progress``, then the output items in order, then
``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut the answer), each
numbered by ``sequence_number``. The items:

* text: a ``message`` item: ``response.output_item.added``, ``response.content_part.added``,
  ``response.output_text.delta``... (with the tokens' logprobs when asked), ``response.output_text.done``,
  ``response.content_part.done``, ``response.output_item.done``;
* each tool call: a ``function_call`` item: ``response.output_item.added`` (arguments empty),
  ``response.function_call_arguments.delta``..., ``response.function_call_arguments.done``,
  ``response.output_item.done``.

A message item exists where the model wrote text, or alone when it wrote neither text nor calls. Text
of a delta is taken to come before the delta's call pieces (a model writes its calls after its text).
The item open when ``max_output_tokens`` cut the answer ends ``incomplete``.

The first events go out only once the model's first output arrived, so a request the model refuses
still gets its HTTP status; errors about chat parameters are reported under the responses parameter they
came from (:data:`CHAT_PARAMS`). Not streamed, the answer is the last event's ``response``: the
collected stream. :data:`RESPONSES` is the route table's serving object.
"""

from __future__ import annotations

import copy
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from app.errors import ServingError
from app.protocol.response_object import (FunctionToolCall, IncompleteDetails, OutputMessage, OutputText, Response,
                                         ResponseEvent, ResponseUsage)
from app.protocol.responses import ResponsesRequest
from app.protocol.structured import chat_logprobs
from app.serving.base import Inbound
from app.serving.generation import GenerationServing

# A chat parameter an error of the mapped request names (itself, or a prefix of it) -> the responses
# parameter to name instead, and the words for it in prose ("the messages use 300 tokens"). Longer first.
CHAT_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("response_format.json_schema.schema", "text.format.schema", "text.format.schema"),
    ("response_format", "text.format", "text.format"),
    ("tool_choice.function.name", "tool_choice.name", "tool_choice.name"),
    ("max_completion_tokens", "max_output_tokens", "max_output_tokens"), ("messages", "input", "input items"))

Event = Callable[..., ResponseEvent]


def renamed(exc: BaseException, body: ResponsesRequest | None = None) -> BaseException:
    """``exc`` (or the ServingError a Ray error carries), naming the responses parameter instead of the
    chat one: a part of one input item by its place in ``input`` (``messages[2].content[1]`` ->
    ``input[1].content[1]``, from ``body``), else by :data:`CHAT_PARAMS`; ``exc`` itself when it names
    none."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, ServingError) else exc
    param = getattr(err, "param", None) if isinstance(err, ServingError) else None
    if param and body is not None and (item := body.input_param(param)) is not None:
        return _naming(err, param, item, item)
    for chat, ours, words in CHAT_PARAMS if param else ():
        if param == chat or param.startswith((chat + ".", chat + "[")):
            return _naming(err, param, ours, words)
    return exc


def _naming(err: ServingError, param: str, ours: str, words: str) -> ServingError:
    out = copy.copy(err)
    out.param, out.message = ours, err.message.replace(f"'{param}'", f"'{ours}'").replace(param, words)
    out.args = (out.message,)
    return out


@dataclass
class _Message:
    """An open ``message`` item: its text pieces and their tokens' logprobs."""

    id: str
    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)

    @property
    def at(self) -> dict[str, Any]:
        return {"item_id": self.id, "output_index": self.index, "content_index": 0}

    def item(self, status: str) -> OutputMessage:
        text = "".join(self.texts)
        content = [OutputText(text=text, logprobs=self.logprobs)] if status != "in_progress" else []
        return OutputMessage(id=self.id, status=status, content=content)

    def opened(self, event: Event) -> Iterator[ResponseEvent]:
        yield event("output_item.added", output_index=self.index, item=self.item("in_progress"))
        yield event("content_part.added", **self.at, part=OutputText(text=""))

    def closed(self, event: Event, item: OutputMessage) -> Iterator[ResponseEvent]:
        part = item.content[0]
        yield event("output_text.done", **self.at, text=part.text, logprobs=part.logprobs)
        yield event("content_part.done", **self.at, part=part)


@dataclass
class _Call:
    """An open ``function_call`` item: the call's id and name, its argument fragments."""

    id: str
    index: int
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)

    def item(self, status: str) -> FunctionToolCall:
        return FunctionToolCall(id=self.id, call_id=self.call_id, name=self.name, status=status,
                                  arguments="".join(self.arguments) if status != "in_progress" else "")

    def opened(self, event: Event) -> Iterator[ResponseEvent]:
        yield event("output_item.added", output_index=self.index, item=self.item("in_progress"))

    def closed(self, event: Event, item: FunctionToolCall) -> Iterator[ResponseEvent]:
        yield event("function_call_arguments.done", item_id=self.id, output_index=self.index, name=item.name,
                    arguments=item.arguments)


class _Answer:
    """One response's output as it streams: items opened and closed in order, events numbered."""

    def __init__(self, body: ResponsesRequest) -> None:
        self.sequence = 0
        self.response = Response(id=f"resp_{secrets.token_hex(24)}", created_at=int(time.time()),
                                 status="in_progress", model=body.model, **body.echo())
        self.items: list[Any] = []
        self.open: _Message | _Call | None = None
        self.pending: list[Any] = []  # logprobs of tokens whose text the parser still holds

    def event(self, type_: str, **fields: Any) -> ResponseEvent:
        event = ResponseEvent(type=f"response.{type_}", sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    def snapshot(self) -> Response:
        return self.response.model_copy(deep=True)

    def started(self) -> Iterator[ResponseEvent]:
        yield self.event("created", response=self.snapshot())
        yield self.event("in_progress", response=self.snapshot())

    def _open(self, kind: type, prefix: str, **fields: Any) -> Iterator[ResponseEvent]:
        """Close the open item, open a ``kind`` item after it."""
        yield from self.close("completed")
        self.open = kind(id=f"{prefix}_{secrets.token_hex(24)}", index=len(self.items), **fields)
        yield from self.open.opened(self.event)

    def close(self, status: str) -> Iterator[ResponseEvent]:
        if self.open is not None:
            item = self.open.item(status)
            yield from self.open.closed(self.event, item)
            yield self.event("output_item.done", output_index=self.open.index, item=item)
            self.items.append(item)
            self.open = None

    def delta(self, d: Any) -> Iterator[ResponseEvent]:
        """One engine delta: its text (with its tokens' logprobs), then its call pieces. Logprobs of a
        delta with neither wait for the next text; those of a delta with only calls belong to them."""
        logprobs = self.pending + chat_logprobs(d.logprobs or [])
        self.pending = [] if d.text or d.tool_calls else logprobs
        if d.text:
            if not isinstance(self.open, _Message):
                yield from self._open(_Message, "msg")
            self.open.texts.append(d.text)
            self.open.logprobs.extend(logprobs)
            yield self.event("output_text.delta", **self.open.at, delta=d.text, logprobs=logprobs)
        for piece in d.tool_calls:
            if piece.id is not None:  # a call's first piece
                yield from self._open(_Call, "fc", call_id=piece.id, name=piece.name or "")
            if piece.arguments and isinstance(self.open, _Call):
                self.open.arguments.append(piece.arguments)
                yield self.event("function_call_arguments.delta", item_id=self.open.id,
                                 output_index=self.open.index, delta=piece.arguments)

    def finished(self, finish: str, prompt_tokens: int, output_tokens: int) -> Iterator[ResponseEvent]:
        complete = finish != "length"
        if not self.items and self.open is None:  # neither text nor calls: an empty message
            yield from self._open(_Message, "msg")
        yield from self.close("completed" if complete else "incomplete")
        self.response = self.response.model_copy(update={
            "status": "completed" if complete else "incomplete", "output": self.items,
            "completed_at": int(time.time()) if complete else None,
            "incomplete_details": None if complete else IncompleteDetails(reason="max_output_tokens"),
            "usage": ResponseUsage(input_tokens=prompt_tokens, output_tokens=output_tokens,
                                   total_tokens=prompt_tokens + output_tokens)})
        yield self.event("completed" if complete else "incomplete", response=self.snapshot())


async def response_events(records: AsyncIterator[list[Any]], body: ResponsesRequest) -> AsyncIterator[ResponseEvent]:
    """The chat model's deltas (one choice) as the event sequence of the module docstring."""
    answer = _Answer(body)
    finish, prompt_tokens, output_tokens = "stop", 0, 0
    try:
        async for batch in records:
            if answer.sequence == 0:
                for event in answer.started():
                    yield event
            for d in batch:
                for event in answer.delta(d):
                    yield event
                if d.finish_reason is not None:
                    finish, prompt_tokens, output_tokens = d.finish_reason, d.prompt_tokens, d.completion_tokens
    except Exception as exc:
        if (err := renamed(exc, body)) is exc:
            raise
        raise err from None
    for event in answer.finished(finish, prompt_tokens, output_tokens):
        yield event


class ResponsesServing(GenerationServing):
    """``POST /v1/responses``: the mapped chat request, through a chat model's ``generate`` method."""

    request_model = ResponsesRequest

    def generation_request(self, body: ResponsesRequest) -> Any:
        return body.chat_request()

    async def validate(self, inbound: Inbound, spec: Any) -> Any:
        try:
            return await super().validate(inbound, spec)
        except ServingError as exc:
            raise renamed(exc) from None

    async def screen(self, body: ResponsesRequest, inbound: Inbound, spec: Any, deployment: Any) -> None:
        try:
            await super().screen(body, inbound, spec, deployment)
        except ServingError as exc:
            raise renamed(exc, body) from None

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
