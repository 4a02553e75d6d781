"""The schemas of ``bench/grammar_engines.py``, each with a valid document: the everyday ones (a nested
object, ``json_object``, a tool call) and the hostile ones (many optional properties, deep nesting, a large
enum, a long regex), as :data:`CASES`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Case:
    """A schema and a valid document of it (serialized with ``json.dumps`` defaults)."""

    schema: dict[str, Any] | None  # None: json_object (any JSON object)
    doc: Any


def _nested() -> Case:
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "scores": {"type": "array", "items": {"type": "number"}}},
        "required": ["name", "age", "role", "address", "tags"], "additionalProperties": False}
    doc = {"name": "Ada Lovelace", "age": 36, "role": "admin", "address": {"city": "London", "zip": "12345"},
           "tags": ["math", "engines"], "scores": [1.5, 2.0]}
    return Case(schema, doc)


def _tools(n: int = 8) -> Case:
    """What ``tools`` + ``tool_choice: required`` compiles to: one of n {name, arguments} objects."""
    kinds = [{"type": "string", "maxLength": 64}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
             {"enum": ["celsius", "fahrenheit", "kelvin"]}]
    calls = []
    for i in range(n):
        params = {f"arg{j}": kinds[(i + j) % len(kinds)] for j in range(2 + i % 3)}
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                      "properties": {"name": {"const": f"function_{i}"},
                                     "arguments": {"type": "object", "properties": params,
                                                   "required": list(params), "additionalProperties": False}}})
    # function_5 takes arg0..arg3 of kinds 0..3: string, integer, number, boolean.
    doc = {"name": "function_5", "arguments": {"arg0": "Paris, France", "arg1": 17, "arg2": 21.5, "arg3": True}}
    return Case({"anyOf": calls}, doc)


def _many_properties(n: int = 300) -> Case:
    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer"}, {"type": "boolean"}]
    props = {f"field_{i:03d}": kinds[i % 3] for i in range(n)}
    values = ["value", 42, False]
    doc = {f"field_{i:03d}": values[i % 3] for i in range(0, n, 30)}  # 10 of them, in declared order
    return Case({"type": "object", "properties": props, "additionalProperties": False}, doc)


def _deep(depth: int = 30) -> Case:
    schema: dict[str, Any] = {"type": "object", "properties": {"level": {"type": "integer"}},
                              "required": ["level"], "additionalProperties": False}
    doc: dict[str, Any] = {"level": depth}
    for level in range(depth - 1, 0, -1):
        schema = {"type": "object", "properties": {"level": {"type": "integer"}, "child": schema},
                  "required": ["level", "child"], "additionalProperties": False}
        doc = {"level": level, "child": doc}
    return Case(schema, doc)


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(letters) for _ in range(rng.randint(4, 11))).capitalize()] = None
    return list(out)


def _big_enum(n: int = 5000) -> Case:
    values = _words(n, seed=1)
    return Case({"type": "object", "properties": {"city": {"enum": values}}, "required": ["city"],
                 "additionalProperties": False}, {"city": values[4321]})


def _long_regex() -> Case:
    words = [w.lower() for w in _words(200, seed=2)]
    pattern = (r"^[A-Z]{3}-[0-9]{4}(\.(" + "|".join(words) + r")){1,8}@[a-z]{2,12}\.(com|org|net|io)$")
    doc = {"ref": f"ABC-1234.{words[5]}.{words[170]}.{words[42]}@example.org"}
    return Case({"type": "object", "properties": {"ref": {"type": "string", "pattern": pattern}},
                 "required": ["ref"], "additionalProperties": False}, doc)


CASES: dict[str, Callable[[], Case]] = {
    "nested object": _nested,
    "json_object": lambda: Case(None, _nested().doc),
    "tool call (anyOf 8)": _tools,
    "300 optional properties": _many_properties,
    "nesting depth 30": _deep,
    "enum of 5,000": _big_enum,
    "regex of ~1.5 kB": _long_regex,
}
