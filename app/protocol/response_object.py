"""The ``/v1/responses`` answer: OpenAI's ``Response`` object, its output items (``message``,
``function_call``) and the streaming events (the request side: ``app.protocol.responses``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, model_serializer

from app.protocol.structured import TokenLogprob

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[TokenLogprob] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionToolCall(BaseModel):
    """A call the model made (OpenAI's FunctionToolCall): ``call_id`` is what the function's output
    answers (a ``function_call_output`` item's ``call_id``)."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[Union[OutputMessage, FunctionToolCall], Field(discriminator="type")]


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
    format: dict[str, Any] = Field(default_factory=lambda: {"type": "text"})


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
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
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
    item: OutputItem | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    name: str | None = None
    arguments: str | None = None
    logprobs: list[TokenLogprob] | None = None
