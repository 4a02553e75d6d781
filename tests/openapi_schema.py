"""Validate JSON bodies against component schemas of the official OpenAI OpenAPI spec.

The spec (``tests/data/openai-openapi.yaml``, vendored unmodified; source, commit and license in
``tests/data/SOURCE.md``) mixes OpenAPI 3.0 ``nullable`` with 3.1 JSON Schema; ``nullable: true`` is
rewritten to "or null" so one JSON Schema 2020-12 validator handles both.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SPEC_PATH = Path(__file__).resolve().parent / "data" / "openai-openapi.yaml"


def _denull(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _denull(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_denull(v) for v in node]
    return node


@functools.lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    with open(SPEC_PATH) as fh:
        return _denull(yaml.safe_load(fh))


@functools.lru_cache(maxsize=None)
def validator(component: str) -> Draft202012Validator:
    spec = _spec()
    registry = Registry().with_resource("spec", Resource.from_contents(
        spec, default_specification=__import__("referencing.jsonschema").jsonschema.DRAFT202012))
    schema = {"$ref": f"spec#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=registry)


def assert_valid(body: Any, component: str) -> None:
    """Raise AssertionError listing every violation of ``component`` by ``body``."""
    errors = sorted(validator(component).iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{component} violations:\n" + "\n".join(
        f"- at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors)


# The spec's schema of each /v1/responses streaming event type this server sends.
RESPONSE_EVENTS = {
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent", "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent"}


def assert_valid_event(event: dict[str, Any]) -> None:
    """A /v1/responses streaming event, against the spec's schema of its type."""
    assert_valid(event, RESPONSE_EVENTS[event["type"]])
