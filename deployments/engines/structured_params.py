"""What a generation request asks of its output's form, for the engine: the constraint that
``response_format``, ``structured_outputs`` or a required/named ``tool_choice`` put on the tokens (a
grammar, ``deployments.engines.grammar``), and the tool-call format that parses the output when the
request has tools (``deployments.engines.tool_parsers``; the model's ``tool_parser`` setting).

At most one constraint applies (the wire models refuse two). A forced tool choice is enforced with the
grammar of the model's own tool-call format, so the calls parse back whatever the model would have
written. CPU work (a grammar's first validation): callers run it off the event loop.
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidRequest
from deployments.engines.tool_parsers import TOOL_FORMATS

# structured_outputs field -> constraint kind (deployments.engines.grammar.GRAMMARS)
_STRUCTURED_KINDS = (("json_", "json_schema", "json"), ("regex", "regex", "regex"),
                     ("choice", "choice", "choice"), ("grammar", "grammar", "grammar"))
# response_format type -> (constraint kind, where its value is, parameter named in errors)
_FORMAT_KINDS = {
    "json_object": ("json_object", lambda f: None, "response_format"),
    "json_schema": ("json_schema", lambda f: closed(f.json_schema.schema_) if f.json_schema.strict
                    else f.json_schema.schema_, "response_format.json_schema.schema"),
}


def _structured(outputs: Any) -> tuple[str, Any, str]:
    if outputs.json_object:
        return "json_object", None, "structured_outputs.json_object"
    for field, kind, name in _STRUCTURED_KINDS:
        value = getattr(outputs, field)
        if value is None:
            continue
        param = f"structured_outputs.{name}"
        if kind == "json_schema" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidRequest(f"{param} is not valid JSON: {exc}", param=param) from None
        return kind, value, param
    raise AssertionError("StructuredOutputs validates that one field is set")


def tool_format(engine: Any) -> Any:
    """The model's tool-call format (its ``tool_parser`` setting)."""
    return TOOL_FORMATS[engine.tool_parser]


# Where a JSON schema holds subschemas: a map of them, one, or a list of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
               "additionalProperties", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not say: what
    ``strict`` means (OpenAI requires it there; JSON Schema's default would let a model add keys)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = closed(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def constraint(request: Any, engine: Any) -> tuple[str, Any, str] | None:
    """``(kind, value, parameter)`` of the request's constraint, or None. A forced tool call wins over
    a response format (its answer is the call, not text), as OpenAI accepts the pair."""
    forced = getattr(request, "forced_tools", None)
    if forced:
        tools = [{"name": t.function.name,
                  "parameters": closed(t.function.parameters) if t.function.strict else t.function.parameters}
                 for t in forced]
        # One call unless parallel calls are allowed (OpenAI's default) and the choice is not one function.
        parallel = request.parallel_tool_calls is not False and request.tool_choice == "required"
        return "lark", tool_format(engine).grammar(tools, parallel), "tool_choice"
    if request.structured_outputs is not None:
        return _structured(request.structured_outputs)
    format_ = request.response_format
    if format_ is not None and format_.type in _FORMAT_KINDS:
        kind, value, param = _FORMAT_KINDS[format_.type]
        return kind, value(format_), param
    return None


def request_grammar(request: Any, engine: Any) -> str | None:
    """The validated grammar of the request's constraint (None: unconstrained); InvalidRequest names
    the parameter of a constraint that cannot compile."""
    found = constraint(request, engine)
    return None if found is None else engine.grammars.compile(*found)


def output_parser(request: Any, engine: Any) -> Any:
    """The tool-call format that parses this request's output, or None (no tools, or tool_choice none)."""
    return tool_format(engine) if getattr(request, "parses_tool_calls", False) else None
