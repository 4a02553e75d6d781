"""``/v1/chat/completions`` wire models (OpenAI ``CreateChatCompletionRequest`` and responses)."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import (BaseModel, Discriminator, Field, PrivateAttr, StrictBool, StrictInt, Tag, field_validator,
                      model_serializer, model_validator)

from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol.common import Usage, WireModel, check_json_bounds, unsupported
from app.protocol.sampling import (SAMPLING_CONFLICTS, SAMPLING_REFUSALS, SamplingRequest, json_over, refuse,
                                   text_size_over, too_long)
from app.protocol.structured import MAX_SCHEMA_DEPTH, MAX_SCHEMA_VALUES, ChoiceLogprobs
from app.protocol.tools import MAX_TOOLS, Tool, ToolCall, ToolCallChunk, ToolCallOut, ToolChoice, forced_tools

FinishReason = Literal["stop", "length", "tool_calls"]
PartType = Literal["text", "image_url", "input_audio", "file", "refusal"]
MAX_TEMPLATE_KWARGS = 32      # top-level keys of chat_template_kwargs
MAX_TEMPLATE_KWARGS_ITEMS = 1024  # values in chat_template_kwargs, nested ones included
MAX_TEMPLATE_KWARGS_DEPTH = 8
# Structure a request may hold whatever the model (its limits.max_messages is at most MAX_MESSAGES),
# counted before anything in it is validated (:func:`check_structure`).
MAX_MESSAGES = 16384
MAX_CONTENT_PARTS = 16384     # content parts, all messages together
MAX_TOOL_CALLS = 4096         # assistant tool calls in the history, all messages together
MAX_TOOLS_VALUES = MAX_SCHEMA_VALUES  # JSON values in all of ``tools`` together (names, schemas, ...)


# The URL forms an image part may take: inline data, a web address the ingress fetches (when the
# config allows it: app/images.py), or a file under the configured root.
IMAGE_URL_FORMS = ("data:image/", "http://", "https://", "file://")
MAX_IMAGE_PARTS = 64  # image parts in one request, whatever the model's own (lower) limit


class ImageURL(WireModel):
    """An ``image_url`` part's image. ``data`` is set by the ingress when it fetched a web or file URL
    (app/images.py): the bytes travel to the replica, which decodes them."""

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None
    _data: bytes | None = PrivateAttr(None)

    @field_validator("url")
    @classmethod
    def _known_form(cls, url: str) -> str:
        head = url[:16].lower()
        if not head.startswith(IMAGE_URL_FORMS):
            raise ValueError("an image URL must be a data:image/...;base64, URL, an http(s):// URL or a "
                             f"file:// URL, got one starting {url[:24]!r}")
        if head.startswith("data:") and ";base64," not in url[:256]:
            raise ValueError("a data: image URL must be base64 (data:image/<type>;base64,<data>)")
        return url

    @property
    def data(self) -> bytes | None:
        return self._data

    def set_data(self, data: bytes) -> None:
        self._data = data


class ContentPart(WireModel):
    """A part of a message's content. Every OpenAI part type parses (so a refusal names the type, not
    a failed union); ``text`` and ``image_url`` parts are served (see :data:`MESSAGE_REFUSALS`)."""

    type: PartType
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _payload(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url' ({\"url\": ...})")
        return self


def _content_kind(value: Any) -> str:
    return "list[parts]" if isinstance(value, list) else "str"


# A string or a list of parts, chosen by the JSON type, so that an error names the branch that applies
# (the tags read as pydantic's own union tags, which app.errors leaves out of parameter paths).
Content = Annotated[Union[Annotated[str, Tag("str")], Annotated[list[ContentPart], Tag("list[parts]")]],
                    Discriminator(_content_kind)]


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    function_call: dict[str, Any] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id' (the id of the call it answers)")
        return self

    def text(self) -> str:
        """The message content as one string (text parts joined; image parts add nothing)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def image_parts(self) -> list[tuple[int, ImageURL]]:
        """``(index in content, image)`` of each image part."""
        parts = self.content if isinstance(self.content, list) else []
        return [(j, part.image_url) for j, part in enumerate(parts) if part.image_url is not None
                and part.type == "image_url"]


def _field(item: Any, name: str) -> Any:
    """A message's field, whether the message is still JSON (a dict) or already a ChatMessage."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def check_structure(messages: Any, tools: Any = None, param: str = "messages") -> None:
    """Refuse (a ``too_long`` validation error naming where) messages, content parts, history tool
    calls or tools beyond the wire's hard caps. Runs on the raw JSON before pydantic validates any of
    it, in O(messages) (plus at most MAX_TOOLS_VALUES values of tools): a body of 900,000 empty messages
    is refused without building 900,000 models. Responses' input items (``param``) count alike."""
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise too_long(param, f"at most {MAX_MESSAGES} messages are allowed, got {len(messages)}")
        parts = calls = 0
        for i, message in enumerate(messages):
            key = "content" if _field(message, "content") is not None else "output"  # a responses item's
            content, tool_calls = _field(message, key), _field(message, "tool_calls")
            parts += len(content) if isinstance(content, list) else 0
            if parts > MAX_CONTENT_PARTS:
                raise too_long(f"{param}[{i}].{key}", f"at most {MAX_CONTENT_PARTS} content parts are "
                               "allowed, all messages together")
            calls += len(tool_calls) if isinstance(tool_calls, list) else 0
            if calls > MAX_TOOL_CALLS:
                raise too_long(f"{param}[{i}].tool_calls", f"at most {MAX_TOOL_CALLS} tool calls are "
                               "allowed in the history, all messages together")
    if isinstance(tools, list) and len(tools) <= MAX_TOOLS:  # more: the field's own max_length says so
        if json_over([t.model_dump() if isinstance(t, BaseModel) else t for t in tools], MAX_TOOLS_VALUES,
                     MAX_SCHEMA_DEPTH + 4):
            raise too_long("tools", f"all tools together may hold at most {MAX_TOOLS_VALUES} JSON values, "
                           f"nested at most {MAX_SCHEMA_DEPTH} deep in a schema")


def _is_set(value: Any) -> bool:
    """Whether a refusable parameter asks for something: absent, null, false and empty are not asks."""
    return value is not None and value is not False and value != [] and value != {}


class ChatCompletionRequest(SamplingRequest):
    """The request body. Every OpenAI and vLLM parameter is either served, accepted as metadata, or
    refused with a 400 naming it (:data:`REFUSALS`, :data:`CONFLICTS`); fields nobody defines are
    ignored. The sampling parameters are :class:`~app.protocol.sampling.SamplingRequest`'s."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    echo: StrictBool = Field(False, description="Extra: prefix the answer with the last message when it "
                             "has the answer's role (vLLM).")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "Extra: variables for the chat template (e.g. enable_thinking)."))
    add_generation_prompt: StrictBool = Field(True, description="Extra: end the prompt with the "
                                              "template's assistant header.")
    continue_final_message: StrictBool = Field(False, description=(
        "Extra: continue the final (assistant) message instead of starting a new one."))
    # Metadata: accepted and not acted on (as OpenAI's own API treats them when nothing is stored).
    store: StrictBool | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded_structure(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_structure(data.get("messages"), data.get("tools"))
        return data

    @field_validator("chat_template_kwargs")
    @classmethod
    def _bounded_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if len(value) > MAX_TEMPLATE_KWARGS:
            raise ValueError(f"at most {MAX_TEMPLATE_KWARGS} keys are allowed, got {len(value)}")
        for key in value:
            if not key.isidentifier():
                raise ValueError(f"keys must be identifiers (template variable names), got {key!r}")
        check_json_bounds(value, MAX_TEMPLATE_KWARGS_ITEMS, MAX_TEMPLATE_KWARGS_DEPTH)
        return value

    @model_validator(mode="after")
    def _refusals(self) -> "ChatCompletionRequest":
        for i, message in enumerate(self.messages):
            for param, refused, reason in MESSAGE_REFUSALS:
                if (where := refused(message)) is not None:
                    raise unsupported(f"messages[{i}]{param}{where}", reason)
        refuse(self, REFUSALS, CONFLICTS)
        if len(images := self.images()) > MAX_IMAGE_PARTS:
            raise unsupported(images[MAX_IMAGE_PARTS][0], f"at most {MAX_IMAGE_PARTS} images are taken in one "
                              f"request, got {len(images)}")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (the current name) wins over the deprecated max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def echo_text(self) -> str:
        """What ``echo`` prefixes every choice with: the last message's text when that message has the
        answer's role (assistant, or with ``add_generation_prompt: false`` the last message's own), as
        vLLM does; else nothing."""
        last = self.messages[-1]
        role = "assistant" if self.add_generation_prompt else last.role
        return last.text() if self.echo and last.role == role else ""

    @property
    def prompt_param(self) -> str:
        return "messages"

    @property
    def top_logprobs_asked(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def forced_tools(self) -> list[Tool] | None:
        """The tools a call must be made to (see ``app.protocol.tools.forced_tools``)."""
        return forced_tools(self.tools, self.tool_choice)

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the model's output is parsed into tool calls (tools given, tool_choice not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def check_limits(self, limits: Any) -> None:
        """The sampling limits, then the model's ``max_messages``: the template's work grows with the
        messages, whatever they hold."""
        super().check_limits(limits)
        if len(self.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages are allowed with this model, got "
                                 f"{len(self.messages)}", param="messages")

    def check_context(self, context_len: int, message_tokens: float = 0.0) -> None:
        """ContextLengthExceeded when the messages cannot fit by their count alone: each renders to at
        least ``message_tokens`` tokens (its role's header and end, whatever its content); one message is
        left out of the count, as a template may fold one (a first system message) into its header."""
        least = (len(self.messages) - 1) * message_tokens
        if least > context_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_len} tokens, but the {len(self.messages)} "
                f"messages take at least {int(least)} tokens (at least {message_tokens:.2f} each, whatever "
                "their content).", param="messages")

    def tools_size_over(self, limit_bytes: int) -> int | None:
        """The characters of the tools' names, descriptions, and their parameters' names and descriptions
        (what a template that writes tools writes of each: ``chat_params.renders_tools``) if over
        ``limit_bytes``, else None; O(tools and their parameters)."""
        texts: list[str] = []
        for function in (t.function for t in self.tools or ()):
            properties = (function.parameters or {}).get("properties")
            properties = properties if isinstance(properties, dict) else {}
            texts += [function.name, function.description or "", *map(str, properties), *(
                p["description"] for p in properties.values() if isinstance(p, dict)
                and isinstance(p.get("description"), str))]
        return text_size_over(texts, limit_bytes)

    def prompt_texts(self) -> list[list[str]]:
        """One prompt: the message contents and names (what :meth:`text_size_over` measures)."""
        return [[t for m in self.messages for t in (m.text(), m.name or "")]]

    def images(self) -> list[tuple[str, ImageURL]]:
        """Every image part in order, with where it is (``messages[i].content[j]``: what errors name)."""
        return [(f"messages[{i}].content[{j}]", image) for i, m in enumerate(self.messages)
                for j, image in m.image_parts()]


def _other_parts(message: ChatMessage) -> str | None:
    parts = message.content if isinstance(message.content, list) else []
    return next((f"[{j}].type" for j, part in enumerate(parts) if part.type not in ("text", "image_url")), None)


def _misplaced_images(message: ChatMessage) -> str | None:
    return f"[{message.image_parts()[0][0]}]" if message.role != "user" and message.image_parts() else None


# What a message may hold that this server cannot honour: (field, where it is refused in the message
# (None: not refused), why). The parameter reported is messages[i] + field + where.
MESSAGE_REFUSALS: tuple[tuple[str, Callable[[ChatMessage], str | None], str], ...] = (
    (".role", lambda m: "" if m.role == "function" else None,
     "function messages belong to the deprecated function calling; use tools and tool messages"),
    (".function_call", lambda m: "" if _is_set(m.function_call) else None,
     "the deprecated function calling is not implemented; use tool_calls"),
    (".content", _other_parts, "only text and image_url content parts are served (no audio or files)"),
    (".content", _misplaced_images, "images are only taken in user messages"),
)

# Request parameters this server does not implement: (parameter, refused when, why).
REFUSALS: tuple[tuple[str, Callable[[ChatCompletionRequest], bool], str], ...] = (
    ("functions", lambda r: _is_set(r.functions),
     "the deprecated function calling is not implemented; use tools"),
    ("function_call", lambda r: _is_set(r.function_call),
     "the deprecated function calling is not implemented; use tool_choice"),
    ("modalities", lambda r: "audio" in (r.modalities or ()), "audio output is not implemented"),
    ("audio", lambda r: _is_set(r.audio), "audio output is not implemented"),
    ("prediction", lambda r: _is_set(r.prediction), "predicted outputs are not implemented"),
    ("reasoning_effort", lambda r: r.reasoning_effort is not None,
     "the served models are not reasoning models"),
    *SAMPLING_REFUSALS,
)

# Parameters that are only valid with another one: (parameter, invalid when, message).
CONFLICTS: tuple[tuple[str, Callable[[ChatCompletionRequest], bool], str], ...] = (
    ("top_logprobs", lambda r: r.top_logprobs is not None and not r.logprobs,
     "'top_logprobs' is only allowed when 'logprobs' is true"),
    ("tool_choice", lambda r: r.tool_choice is not None and not r.tools,
     "'tool_choice' is only allowed when 'tools' are specified"),
    ("parallel_tool_calls", lambda r: r.parallel_tool_calls is True and not r.tools,
     "'parallel_tool_calls' is only allowed when 'tools' are specified"),
    ("tool_choice.function.name", lambda r: r.tools and r.forced_tools == [],
     "'tool_choice' names a function that is not among 'tools'"),
    *SAMPLING_CONFLICTS,
    ("continue_final_message", lambda r: r.continue_final_message and r.add_generation_prompt,
     "'continue_final_message' and 'add_generation_prompt' cannot both be true "
     "('add_generation_prompt' defaults to true: set it to false)"),
    ("continue_final_message", lambda r: r.continue_final_message and r.messages[-1].role != "assistant",
     "'continue_final_message' needs an assistant message last, to continue it"),
)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _calls_if_any(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if not (k == "tool_calls" and v is None)}


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # A delta carries only what changed: the role once, then content pieces or tool-call pieces.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
