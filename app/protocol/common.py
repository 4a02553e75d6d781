"""Wire pieces shared by several endpoints.

Every request model derives from :class:`WireModel`, which holds the rules all wire text and numbers
obey: text must be valid Unicode (no lone surrogates), numbers finite. Refusals that the schema cannot
express as a type (a feature this server does not implement, two parameters that exclude each other) are
raised with :func:`unsupported` and :func:`conflict`, so every such answer has one shape. These error
``type`` strings become the OpenAI error ``code`` (``app.errors.validation_error``), and an ``at``
entry of the error context extends the parameter path the error is reported at.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

INVALID_UNICODE = "invalid_unicode"
UNSUPPORTED = "unsupported_parameter"
CONFLICT = "invalid_parameter_combination"


def unsupported(param: str, reason: str) -> PydanticCustomError:
    """The refusal of a parameter (or a value of it) that this server does not implement."""
    return PydanticCustomError(UNSUPPORTED, "'{param}' is not supported by this server: {reason}.",
                               {"param": param, "reason": reason, "at": param})


def conflict(param: str, message: str) -> PydanticCustomError:
    """The refusal of ``param`` because of the value of another parameter."""
    return PydanticCustomError(CONFLICT, "{message}", {"message": message, "at": param})


def lone_surrogate_at(value: Any) -> tuple[str, str] | None:
    """(path inside ``value``, offending character) of the first string holding a lone surrogate.

    Such strings only arrive through JSON ``\\ud800`` escapes without their pair; they are not Unicode
    text, and the tokenizers reject them. Dict keys are checked too (reported at their dict). Iterative,
    so arbitrarily deep JSON cannot overflow the stack; nested wire models checked themselves already.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, item[exc.start]
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            for key, v in reversed(list(item.items())):
                stack.append((f"{path}.{key}", v))
                stack.append((path, key))
    return None


def check_json_bounds(value: Any, max_values: int, max_depth: int) -> Any:
    """``value``, or ValueError if it holds more than ``max_values`` JSON values or nests deeper than
    ``max_depth`` (iteratively: deep input must not exhaust the stack). Free-form JSON fields need it:
    a request is pickled to reach its replica, and pickling recurses once per level."""
    stack, values = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        values += 1
        if values > max_values or depth > max_depth:
            raise ValueError(f"at most {max_values} values nested at most {max_depth} deep are allowed")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


class WireModel(BaseModel):
    """Base of request models: unknown fields are ignored (clients send vendor extras), known ones are
    validated strictly enough that a bad value is a 400 naming the field. NaN and ±Infinity (which
    Python's JSON parser accepts) are refused in every float, and a lone surrogate in any text."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        found = lone_surrogate_at(value)
        if found is not None:
            where, char = found
            raise PydanticCustomError(
                INVALID_UNICODE, "the text holds a lone surrogate (U+{code}), which is not valid "
                "Unicode: surrogate escapes in JSON strings must come in pairs",
                {"code": f"{ord(char):04X}", "at": where})
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
