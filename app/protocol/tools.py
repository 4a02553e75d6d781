"""Wire models of tool calling (OpenAI's function tools), shared by chat and responses.

A request lists ``tools`` (function definitions with JSON-schema ``parameters``) and a ``tool_choice``:
``none`` (tools are shown to the model, no call is parsed), ``auto`` (the model may call; its output is
parsed into calls), ``required`` (at least one call, enforced by a grammar) or a named function (that
call, enforced). The model's tool-call format is a per-model setting (``tool_parser`` in the config);
``deployments/engines/tool_parsers.py`` holds the formats.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, model_serializer

from app.protocol.common import WireModel
from app.protocol.structured import Schema

MAX_TOOLS = 128
FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


class FunctionDefinition(WireModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: Schema | None = None
    strict: StrictBool | None = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(WireModel):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(WireModel):
    name: str
    arguments: str


class ToolCall(WireModel):
    """A call in an assistant message of the history (as the model made it earlier)."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


def forced_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> list[Tool] | None:
    """The tools a call must be made to (``required``: any; a named choice: that one), or None when the
    model may answer freely."""
    if not tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return list(tools)
    return [t for t in tools if t.function.name == choice.function.name]


# --- in answers -------------------------------------------------------------------------------------

class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _Sparse(BaseModel):
    """A streamed piece: fields it does not carry are left out, not null."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallChunk(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(_Sparse):
    """A streamed piece of a call: the first has ``id``, ``type`` and the name; later ones add
    argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallChunk


def tool_call_chunks(pieces: list[Any]) -> list[ToolCallChunk]:
    """Engine ``ToolCallDelta`` pieces as wire pieces, one per run of pieces of the same call (its
    argument fragments joined): clients such as instructor read one entry per call and chunk."""
    out: list[ToolCallChunk] = []
    for piece in pieces:
        if out and out[-1].index == piece.index:
            out[-1].function.arguments = (out[-1].function.arguments or "") + piece.arguments
            continue
        first = piece.id is not None
        out.append(ToolCallChunk(index=piece.index, id=piece.id, type="function" if first else None,
                                 function=FunctionCallChunk(name=piece.name, arguments=piece.arguments)))
    return out
