"""``/v1/responses`` request wire models (OpenAI ``CreateResponse``; the answer's models, ``Response`` and
the streaming events, are in ``app.protocol.response_object``).

A request maps onto a chat request (:meth:`ResponsesRequest.chat_request`): ``instructions`` become a
system message; ``input`` (a string, or items) the messages: message items as they are, consecutive
``function_call`` items as one assistant message with ``tool_calls`` (joining the assistant message
right before them: one turn), each ``function_call_output`` a ``tool`` message; function ``tools``
(flattened here: ``{"type": "function", "name", "parameters", ...}``), ``tool_choice`` and
``parallel_tool_calls`` as chat's; ``text.format`` (``json_object``, flattened ``json_schema``) as
``response_format``; ``top_logprobs`` (or ``include: ["message.output_text.logprobs"]``) as logprobs;
``max_output_tokens`` the completion length. So the responses family has no generation path of its
own. Nothing is stored: ``previous_response_id``, ``conversation`` and ``background`` are refused with
a 400, and ``store`` is accepted and ignored (README: Responses); so are hosted tools (web search, file
search, MCP, ...) and input items other than messages and function calls with their outputs.

Union branches are tagged ``kind[tag]``: ``app.errors`` leaves such tags out of the parameter path, so a
400 names e.g. ``tools[1].type``.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Discriminator, Field, PrivateAttr, StrictBool, StrictInt, Tag, model_validator
from pydantic_core import PydanticCustomError

from app.protocol.chat import check_structure
from app.protocol.common import UNSUPPORTED, WireModel, conflict
from app.protocol.structured import Schema
from app.protocol.sampling import Number, refuse
from app.protocol.tools import FUNCTION_NAME, MAX_TOOLS

MAX_INPUT_ITEMS = 4096
MAX_INCLUDE = 64  # entries of `include` (OpenAI defines fewer than ten values)
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _refused_type(what: str, reason: str) -> PydanticCustomError:
    """The refusal of an item, part or tool by its ``type`` (reported at ``<its path>.type``)."""
    return PydanticCustomError(UNSUPPORTED, "'type' is not supported by this server: {what} {reason}.",
                               {"what": what, "reason": reason, "at": ".type"})


def _tagged(kind: str, served: tuple[str, ...]) -> Callable[[Any], str]:
    """A discriminator by ``type`` (default ``served[0]``): ``kind[type]`` for the served types,
    ``kind[other]`` for the rest (a branch that refuses them by name)."""
    def tag(value: Any) -> str:
        found = value.get("type", served[0]) if isinstance(value, dict) else served[0]
        return f"{kind}[{found if found in served else 'other'}]"
    return tag


class InputText(WireModel):
    """A part of an input message or of a function's output: text (``output_text`` parts come from
    earlier responses' output) or, in a message, an ``input_image`` by URL (a data URL, or a web or
    file URL as the ingress allows: README, Images)."""

    type: Literal["input_text", "output_text", "input_image", "input_file", "input_audio", "refusal"]
    text: str | None = None
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    @model_validator(mode="after")
    def _served(self) -> "InputText":
        if self.type == "input_image":
            if self.file_id is not None or self.image_url is None:
                raise _refused_type("input_image parts by 'file_id' are", "not served here (nothing is "
                                    "stored); send 'image_url' (a data: or http(s) URL)")
            return self
        if self.type not in ("input_text", "output_text"):
            raise _refused_type(f"{self.type!r} parts are", "not served here; only text and image parts")
        if self.text is None:
            raise ValueError(f"an {self.type} part needs 'text'")
        return self

    def chat(self) -> dict[str, Any]:
        """The part as a chat content part."""
        if self.type == "input_image":
            return {"type": "image_url", "image_url": {"url": self.image_url, "detail": self.detail}}
        return {"type": "text", "text": self.text}


def _content_kind(value: Any) -> str:
    return "list[parts]" if isinstance(value, list) else "str"


Text = Annotated[Union[Annotated[str, Tag("str")], Annotated[list[InputText], Tag("list[parts]")]],
                 Discriminator(_content_kind)]


def _joined(content: str | list[InputText]) -> str:
    return content if isinstance(content, str) else "".join(p.text or "" for p in content)


class InputMessage(WireModel):
    """A message item of ``input`` (OpenAI's EasyInputMessage / InputMessage / an earlier output message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return _joined(self.content)

    def add_to(self, messages: list[dict[str, Any]]) -> None:
        """Text content as one string; content with images as chat parts (text and image_url)."""
        images = isinstance(self.content, list) and any(p.type == "input_image" for p in self.content)
        messages.append({"role": self.role, "content": [p.chat() for p in self.content] if images else self.text()})


class FunctionCallInput(WireModel):
    """An earlier call of the model (OpenAI's FunctionToolCall, sent back as input)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None

    def add_to(self, messages: list[dict[str, Any]]) -> None:
        """Joins the assistant turn right before it (its text, its other calls), else starts one."""
        call = {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if messages and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


class FunctionCallOutputInput(WireModel):
    """What a function call returned (OpenAI's FunctionCallOutputItemParam): a ``tool`` message."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Text
    id: str | None = None
    status: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "FunctionCallOutputInput":
        if isinstance(self.output, list) and any(p.type == "input_image" for p in self.output):
            raise _refused_type("input_image parts in a function's output are", "not served here; only text")
        return self

    def add_to(self, messages: list[dict[str, Any]]) -> None:
        messages.append({"role": "tool", "tool_call_id": self.call_id, "content": _joined(self.output)})


class OtherItem(WireModel):
    """Any other input item type (reasoning, item references, hosted tools' calls): refused."""

    type: str

    @model_validator(mode="after")
    def _refused(self) -> "OtherItem":
        raise _refused_type(f"input items of type {self.type!r} are", "not served here (nothing is stored, "
                            "and only function tools are served); only messages, function_call and "
                            "function_call_output items")


InputItem = Annotated[Union[Annotated[InputMessage, Tag("item[message]")],
                            Annotated[FunctionCallInput, Tag("item[function_call]")],
                            Annotated[FunctionCallOutputInput, Tag("item[function_call_output]")],
                            Annotated[OtherItem, Tag("item[other]")]],
                      Discriminator(_tagged("item", ("message", "function_call", "function_call_output")))]


class FunctionTool(WireModel):
    """A function the model may call (OpenAI's FunctionTool: chat's function definition, flattened)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: Schema | None = None
    strict: StrictBool | None = None

    def chat(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}

    def echo(self) -> dict[str, Any]:
        """As the Response lists it (every field present, null when not given)."""
        return self.model_dump()


class OtherTool(WireModel):
    """A hosted or custom tool (web search, file search, computer use, MCP, custom...): refused."""

    type: str

    @model_validator(mode="after")
    def _refused(self) -> "OtherTool":
        raise _refused_type(f"tools of type {self.type!r} are", "not served here; only 'function' tools")


ResponsesTool = Annotated[Union[Annotated[FunctionTool, Tag("tool[function]")],
                                Annotated[OtherTool, Tag("tool[other]")]],
                          Discriminator(_tagged("tool", ("function",)))]


class FunctionChoice(WireModel):
    """``tool_choice`` naming the function to call (OpenAI's ToolChoiceFunction)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class OtherChoice(WireModel):
    type: str

    @model_validator(mode="after")
    def _refused(self) -> "OtherChoice":
        raise _refused_type(f"a tool_choice of type {self.type!r} is", "not served here; only 'none', "
                            "'auto', 'required' or {'type': 'function', 'name': ...}")


def _choice_kind(value: Any) -> str:
    return "choice[mode]" if isinstance(value, str) else _tagged("choice", ("function",))(value)


ToolChoice = Annotated[Union[Annotated[Literal["none", "auto", "required"], Tag("choice[mode]")],
                             Annotated[FunctionChoice, Tag("choice[function]")],
                             Annotated[OtherChoice, Tag("choice[other]")]],
                       Discriminator(_choice_kind)]


class PlainText(WireModel):
    type: Literal["text"]


class JsonObject(WireModel):
    type: Literal["json_object"]


class JsonSchema(WireModel):
    """``text.format`` of type ``json_schema`` (chat's ``response_format.json_schema``, flattened)."""

    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    schema_: Schema = Field(alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


def _format_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    return f"format[{kind}]" if kind in ("text", "json_object", "json_schema") else None


TextFormat = Annotated[Union[Annotated[PlainText, Tag("format[text]")],
                             Annotated[JsonObject, Tag("format[json_object]")],
                             Annotated[JsonSchema, Tag("format[json_schema]")]],
                       Discriminator(_format_kind, custom_error_type="invalid_format", custom_error_message=(
                           "format must be an object whose type is 'text', 'json_object' or 'json_schema'"))]


class TextParam(WireModel):
    format: TextFormat = Field(default_factory=lambda: PlainText(type="text"))

    def chat(self) -> dict[str, Any] | None:
        """The chat ``response_format`` (None: plain text)."""
        f = self.format
        if isinstance(f, JsonSchema):
            return {"type": "json_schema", "json_schema": f.model_dump(by_alias=True, exclude={"type"},
                                                                       exclude_none=True)}
        return None if isinstance(f, PlainText) else {"type": f.type}

    def echo(self) -> dict[str, Any]:
        return {"format": self.format.model_dump(by_alias=True, exclude_none=True)}


class ResponsesRequest(WireModel):
    """The request body: served, accepted as metadata, or refused with a 400 naming the parameter
    (:data:`REFUSALS`, :data:`CONFLICTS`); fields nobody defines are ignored."""

    model: str = Field(min_length=1)
    input: Annotated[Union[Annotated[str, Tag("str")],
                           Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS),
                                     Tag("list[items]")]],
                     Discriminator(lambda v: "list[items]" if isinstance(v, list) else "str")]
    instructions: str | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0.0, le=2.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64, description="Extra: as chat's seed.")
    stream: StrictBool = False
    text: TextParam | None = None
    tools: list[ResponsesTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    include: list[str] | None = Field(None, max_length=MAX_INCLUDE)
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: StrictBool | None = None
    prompt: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    # Metadata: accepted and not acted on (nothing is stored).
    store: StrictBool | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    _chat: Any = PrivateAttr(None)
    # Chat message index -> the index of the input item that opened it (filled by messages()).
    _items: dict[int, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bounded_structure(cls, data: Any) -> Any:
        """Content parts of the input items and the tools' size within chat's caps, counted on the raw
        JSON before any of it is validated (``app.protocol.chat.check_structure``)."""
        if isinstance(data, dict):
            items = data.get("input")
            check_structure(items if isinstance(items, list) and len(items) <= MAX_INPUT_ITEMS else None,
                            data.get("tools"), param="input")
        return data

    @model_validator(mode="after")
    def _refusals(self) -> "ResponsesRequest":
        refuse(self, REFUSALS, CONFLICTS)
        called: set[str] = set()
        for i, item in enumerate(self.input_items):
            if isinstance(item, FunctionCallInput):
                called.add(item.call_id)
            elif isinstance(item, FunctionCallOutputInput) and item.call_id not in called:
                raise conflict(f"input[{i}].call_id", f"no function_call item before this output has call_id "
                               f"{item.call_id!r}")
        return self

    @property
    def input_items(self) -> list[Any]:
        return [] if isinstance(self.input, str) else self.input

    @property
    def function_names(self) -> set[str]:
        return {t.name for t in self.tools or ()}

    @property
    def forces_a_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, FunctionChoice)

    @property
    def top_logprobs_asked(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs asked)."""
        asked = self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or ())
        return (self.top_logprobs or 0) if asked else None

    def messages(self) -> list[dict[str, Any]]:
        """``instructions`` and ``input`` as chat messages."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for k, item in enumerate(self.input):
            opened = len(messages)
            item.add_to(messages)
            self._items.update(dict.fromkeys(range(opened, len(messages)), k))
        return messages

    def input_param(self, param: str) -> str | None:
        """Where in ``input`` the mapped chat request's ``messages[i]...`` is (``input[k]...``), or None
        when that message is not one input item's (the instructions, a string input)."""
        head, sep, rest = param.partition("]")
        if not (sep and head.startswith("messages[") and head[9:].isdigit()) or int(head[9:]) not in self._items:
            return None
        return f"input[{self._items[int(head[9:])]}]{rest}"

    def chat_request(self) -> Any:
        """The chat request this maps onto, made once (raises pydantic's ValidationError as any request
        does)."""
        from app.protocol.chat import ChatCompletionRequest

        if self._chat is None:
            choice = self.tool_choice
            tools = {"tools": [t.chat() for t in self.tools], "parallel_tool_calls": self.parallel_tool_calls,
                     "tool_choice": ({"type": "function", "function": {"name": choice.name}}
                                     if isinstance(choice, FunctionChoice) else choice)} if self.tools else {}
            logprobs = self.top_logprobs_asked
            self._chat = ChatCompletionRequest.model_validate({
                "model": self.model, "messages": self.messages(), "max_completion_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "user": self.user,
                "response_format": self.text.chat() if self.text else None, **tools,
                "logprobs": logprobs is not None, "top_logprobs": logprobs})
        return self._chat

    def echo(self) -> dict[str, Any]:
        """The request's settings as the Response repeats them."""
        choice = self.tool_choice
        return {
            "instructions": self.instructions, "temperature": self.temperature, "top_p": self.top_p,
            "max_output_tokens": self.max_output_tokens, "metadata": self.metadata or {}, "user": self.user,
            "tools": [t.echo() for t in self.tools or ()], "top_logprobs": self.top_logprobs,
            "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "text": self.text.echo() if self.text else {"format": {"type": "text"}}}


def _asks(value: Any) -> bool:
    return value not in (None, False, [], {}, "")


# Parameters this server does not implement: (parameter, refused when, why).
REFUSALS: tuple[tuple[str, Callable[[ResponsesRequest], bool], str], ...] = (
    ("previous_response_id", lambda r: _asks(r.previous_response_id),
     "responses are not stored here; send the whole conversation in 'input'"),
    ("conversation", lambda r: _asks(r.conversation),
     "conversations are not stored here; send the whole conversation in 'input'"),
    ("background", lambda r: r.background is True, "background responses are not implemented"),
    ("prompt", lambda r: _asks(r.prompt), "stored prompt templates are not implemented"),
    ("reasoning", lambda r: _asks(r.reasoning and {k: v for k, v in r.reasoning.items() if v is not None}),
     "the served models are not reasoning models"),
)

# Parameters that contradict others: (parameter, broken when, message).
CONFLICTS: tuple[tuple[str, Callable[[ResponsesRequest], bool], str], ...] = (
    ("tool_choice", lambda r: r.forces_a_call and not r.tools,
     "a 'required' or named 'tool_choice' needs function 'tools' to call"),
    ("tool_choice.name", lambda r: isinstance(r.tool_choice, FunctionChoice) and r.tools
     and r.tool_choice.name not in r.function_names, "'tool_choice' names a function that is not among 'tools'"),
)
