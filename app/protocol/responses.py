"""``/v1/responses`` wire models (OpenAI ``CreateResponse``, ``Response`` and the streaming events).

A request maps onto a chat request (:meth:`ResponsesRequest.chat_request`): ``instructions`` become a
system message, ``input`` (a string, or message items whose content is a string or text parts) the
messages, ``max_output_tokens`` the completion length; so the responses family has no generation path
of its own. Nothing is stored: ``previous_response_id``, ``conversation`` and ``background`` are refused
with a 400, and ``store`` is accepted and ignored (README: Responses).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import (BaseModel, Discriminator, Field, PrivateAttr, StrictBool, StrictInt, Tag, model_serializer,
                      model_validator)

from app.protocol.common import WireModel, unsupported
from app.protocol.sampling import Number, refuse

MAX_INPUT_ITEMS = 4096


class InputText(WireModel):
    """A text part of an input message (``output_text`` parts come from earlier responses' output)."""

    type: Literal["input_text", "output_text", "input_image", "input_file", "input_audio", "refusal"]
    text: str | None = None

    @model_validator(mode="after")
    def _served(self) -> "InputText":
        if self.type not in ("input_text", "output_text"):
            raise unsupported("type", f"only text parts are served here, not {self.type!r}")
        if self.text is None:
            raise ValueError(f"an {self.type} part needs 'text'")
        return self


def _content_kind(value: Any) -> str:
    return "list[parts]" if isinstance(value, list) else "str"


class InputMessage(WireModel):
    """A message item of ``input`` (OpenAI's EasyInputMessage / InputMessage / an earlier output message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[Union[Annotated[str, Tag("str")], Annotated[list[InputText], Tag("list[parts]")]],
                       Discriminator(_content_kind)]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else "message"
    return "message" if kind == "message" else "other"


class OtherItem(WireModel):
    """Any other input item type (function calls and their outputs, reasoning, references): refused."""

    type: str

    @model_validator(mode="after")
    def _refused(self) -> "OtherItem":
        raise unsupported("type", f"input items of type {self.type!r} are not served (tool calling and "
                          "stored items are not implemented); only messages")


InputItem = Annotated[Union[Annotated[InputMessage, Tag("message")], Annotated[OtherItem, Tag("other")]],
                      Discriminator(_item_kind)]


class TextFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"] = "text"


class TextParam(WireModel):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(WireModel):
    """The request body: served, accepted as metadata, or refused with a 400 naming the parameter
    (:data:`REFUSALS`); fields nobody defines are ignored."""

    model: str = Field(min_length=1)
    input: Annotated[Union[Annotated[str, Tag("str")],
                           Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS),
                                     Tag("list[items]")]],
                     Discriminator(lambda v: "list[items]" if isinstance(v, list) else "str")]
    instructions: str | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0.0, le=2.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    stream: StrictBool = False
    text: TextParam | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: StrictBool | None = None
    prompt: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    # Metadata: accepted and not acted on (nothing is stored).
    store: StrictBool | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    _chat: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _refusals(self) -> "ResponsesRequest":
        refuse(self, REFUSALS)
        return self

    def messages(self) -> list[dict[str, Any]]:
        """``instructions`` and ``input`` as chat messages."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*system, {"role": "user", "content": self.input}]
        return [*system, *({"role": m.role, "content": m.text()} for m in self.input)]

    def chat_request(self) -> Any:
        """The chat request this maps onto, made once (raises pydantic's ValidationError as any request
        does)."""
        from app.protocol.chat import ChatCompletionRequest

        if self._chat is None:
            self._chat = ChatCompletionRequest.model_validate({
                "model": self.model, "messages": self.messages(), "max_completion_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "user": self.user})
        return self._chat


def _asks(value: Any) -> bool:
    return value not in (None, False, [], {}, "")


# Parameters this server does not implement: (parameter, refused when, why).
REFUSALS: tuple[tuple[str, Callable[[ResponsesRequest], bool], str], ...] = (
    ("tools", lambda r: _asks(r.tools), "tool calling is not implemented"),
    ("tool_choice", lambda r: r.tool_choice not in (None, "none", "auto"), "tool calling is not implemented"),
    ("text.format.type", lambda r: r.text is not None and r.text.format.type != "text",
     "structured output (json_object, json_schema) is not implemented; only 'text'"),
    ("top_logprobs", lambda r: _asks(r.top_logprobs), "log probabilities are not implemented"),
    ("previous_response_id", lambda r: _asks(r.previous_response_id),
     "responses are not stored here; send the whole conversation in 'input'"),
    ("conversation", lambda r: _asks(r.conversation),
     "conversations are not stored here; send the whole conversation in 'input'"),
    ("background", lambda r: r.background is True, "background responses are not implemented"),
    ("prompt", lambda r: _asks(r.prompt), "stored prompt templates are not implemented"),
    ("reasoning", lambda r: _asks(r.reasoning and {k: v for k, v in r.reasoning.items() if v is not None}),
     "the served models are not reasoning models"),
)


# --- the answer ---------------------------------------------------------------------------------------

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class TextConfig(BaseModel):
    format: dict[str, str] = Field(default_factory=lambda: {"type": "text"})


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    model: str
    output: list[OutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    tool_choice: Literal["none", "auto"] = "auto"
    tools: list[Any] = Field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: None = None
    reasoning: None = None
    store: bool = False
    text: TextConfig = Field(default_factory=TextConfig)
    truncation: Literal["disabled"] = "disabled"
    user: str | None = None
    usage: ResponseUsage | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # Unlike the other fields, these two may be absent but not null in the spec's Response.
        return {k: v for k, v in handler(self).items() if not (k in ("user", "usage") and v is None)}


class ResponseEvent(BaseModel):
    """One streaming event: ``type`` and ``sequence_number`` plus the fields of that type (the ones
    left None are not sent)."""

    type: str
    sequence_number: int
    response: Response | None = None
    output_index: int | None = None
    item: OutputMessage | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    logprobs: list[Any] | None = None
