"""``/v1/embeddings`` wire models (pydantic only): OpenAI's ``CreateEmbeddingRequest`` plus vLLM's
``truncate_prompt_tokens``, and the ``CreateEmbeddingResponse`` pieces.

``input`` takes OpenAI's four shapes: a string, a list of strings, a list of token ids (one input), or a
list of lists of token ids. An empty string, an empty list or an empty token list is refused, as OpenAI
does, with the error naming the offending element (``input[2]``); so is any other type. Whether token ids
are in the model's vocabulary and inputs fit its length is the model's to say (the deployment checks).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, Field, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from app.protocol.common import WireModel

_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", type(None): "null",
               dict: "an object", list: "an array"}


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _bad(message: str, at: str = "") -> PydanticCustomError:
    return PydanticCustomError("invalid_input", "{message}", {"message": message, "at": at})


def _check_ids(ids: list[Any], at: str) -> None:
    for j, token in enumerate(ids):
        if type(token) is not int:
            raise _bad(f"expected a token id (an integer), got {_kind(token)}", f"{at}[{j}]")
        if token < 0:
            raise _bad(f"token ids are not negative, got {token}", f"{at}[{j}]")


def check_input_shape(value: Any) -> Any:
    """Refuse (with the path of the first bad element) what is none of the four shapes or is empty."""
    if isinstance(value, str):
        if not value:
            raise _bad("the input must not be an empty string")
        return value
    if not isinstance(value, list):
        raise _bad(f"expected {_SHAPES}, got {_kind(value)}")
    if not value:
        raise _bad("the input must not be an empty list")
    first = value[0]
    if isinstance(first, str):
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise _bad(f"expected a string like input[0], got {_kind(text)}", f"[{i}]")
            if not text:
                raise _bad("the input must not be an empty string", f"[{i}]")
    elif type(first) is int:
        _check_ids(value, "")
    elif isinstance(first, list):
        for i, ids in enumerate(value):
            if not isinstance(ids, list):
                raise _bad(f"expected a list of token ids like input[0], got {_kind(ids)}", f"[{i}]")
            if not ids:
                raise _bad("a token list must not be empty", f"[{i}]")
            _check_ids(ids, f"[{i}]")
    else:
        raise _bad(f"expected {_SHAPES}; input[0] is {_kind(first)}", "[0]")
    return value


class EmbeddingRequest(WireModel):
    """``POST /v1/embeddings``."""

    model: str = Field(min_length=1)
    input: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(description=(
        "Text to embed, or token ids: a string, a list of strings, a list of token ids, or a list of lists "
        "of token ids (several inputs). Token ids are the model's input as given: no special tokens are "
        "added. No empty string or list."))
    encoding_format: Literal["float", "base64"] = Field("float", description=(
        "`float`: lists of numbers; `base64`: each vector's float32 values, little-endian, base64-encoded."))
    dimensions: int | None = Field(None, ge=1, description=(
        "Length of the returned vectors: the model's own size, or one of the Matryoshka sizes its config "
        "lists (the vector's first components, renormalised when the model normalises)."))
    user: str | None = Field(None, max_length=256, description="An end-user id (accepted, not used).")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description=(
        "vLLM's extension: truncate each input to this many tokens (-1 = the model's maximum) instead of "
        "refusing a longer one."))

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        return check_input_shape(value)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (the model's maximum) or a positive token count")
        return value

    @property
    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list (a string or a flat list of token ids is one input)."""
        single = isinstance(self.input, str) or isinstance(self.input[0], int)
        return [self.input] if single else self.input

    @property
    def size(self) -> int:
        """Characters of text, or token ids, in the request: how much tokenizing or checking it needs."""
        return sum(len(item) for item in self.inputs)

    @property
    def count(self) -> int:
        """How many inputs the request holds."""
        return len(self.inputs)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
