"""Hostile request shapes (issue "Reliability under abuse": requests cheap to send and costly to refuse).

Each :class:`Shape` is a body under the 32 MiB body limit whose *structure* (not its text) would make the
server work: many messages, many content parts, deep content, many or long stop strings, a huge
``logit_bias``, many or huge tools, many history tool calls, many completions prompts, long token-id
prompts... with what the server must answer: a 400 naming ``param`` (and ``code`` when given), or a
normal answer (``param`` None). ``refused_by`` says which check refuses it for the test app's
``demo-chat`` (context 1024, ``GenerationLimits`` defaults but ``max_tokens: 512``):

- ``wire``: the request model's hard caps, before its items are validated;
- ``ingress``: the ingress's screen (the model's limits; for a body over 256 KiB also its context);
- ``replica``: the replica, before its chat template runs (or before the tokenizer, for rendered text);
- ``none``: answered normally.

The unit tests run every shape through the request models and checks without Ray
(``tests/unit/test_structural_bounds.py``); the integration test sends them to the server
(``tests/integration/test_structural_bounds.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

MODEL = "demo-chat"
CONTEXT_LEN = 1024
BODY_LIMIT = 32 * 2**20


@dataclass(frozen=True)
class Shape:
    name: str
    route: str
    build: Callable[[], dict[str, Any]]  # the body without its model (built lazily: some are 30 MB)
    param: str | None  # the 400's param; None: a normal answer
    refused_by: str  # wire | ingress | replica | none
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"model": MODEL, **self.build()}


def user(content: Any = "") -> dict[str, Any]:
    return {"role": "user", "content": content}


def tool_message(i: int) -> dict[str, Any]:
    return {"role": "tool", "content": "", "tool_call_id": f"call-{i:056d}"}  # ids are not message text


def calls(k: int) -> list[dict[str, Any]]:
    return [{"id": f"c{j}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for j in range(k)]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def tool(name: str = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


HI = [user("hi")]
SHORT = {"max_tokens": 2, "temperature": 0}
CONTEXT = "context_length_exceeded"

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"

SHAPES: tuple[Shape, ...] = (
    # --- chat: messages and their parts ----------------------------------------------------------------
    Shape("900k-empty-messages", CHAT, lambda: {"messages": [user()] * 900_000}, "messages", "wire"),
    Shape("60k-one-char-messages", CHAT, lambda: {"messages": [user("x")] * 60_000}, "messages", "wire"),
    Shape("messages-over-the-model-limit", CHAT, lambda: {"messages": [user()] * 4097}, "messages", "ingress"),
    Shape("empty-messages-beyond-the-context", CHAT, lambda: {"messages": [user()] * 3000, **SHORT},
          "messages", "replica", CONTEXT),
    Shape("tool-messages-beyond-the-context-large-body", CHAT, lambda: {
        "messages": HI + [tool_message(i) for i in range(4000)], **SHORT}, "messages", "ingress", CONTEXT),
    Shape("900k-empty-parts", CHAT, lambda: {"messages": [user([{"type": "text", "text": ""}] * 900_000)]},
          "messages[0].content", "wire"),
    Shape("16k-empty-parts-answered", CHAT, lambda: {
        "messages": [user([{"type": "text", "text": ""}] * 16_000 + [{"type": "text", "text": "hi"}])], **SHORT},
          None, "none"),
    Shape("deep-content-list", CHAT, lambda: {"messages": [user(nested(400))]}, "messages[0].content[0]", "wire"),
    Shape("history-tool-calls", CHAT, lambda: {
        "messages": HI + [{"role": "assistant", "content": "", "tool_calls": calls(100)}] * 50},
          "messages[41].tool_calls", "wire"),
    Shape("deeply-nested-tool-arguments", CHAT, lambda: {"messages": HI + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}]}], **SHORT},
          "messages", "replica", CONTEXT),
    # --- chat: sampling parameters ---------------------------------------------------------------------
    Shape("7M-stop-strings", CHAT, lambda: {"messages": HI, "stop": ["x"] * 7_000_000}, "stop", "wire"),
    Shape("stop-strings-over-the-model-limit", CHAT, lambda: {"messages": HI, "stop": ["x"] * 64}, "stop", "ingress"),
    Shape("30MB-stop-string", CHAT, lambda: {"messages": HI, "stop": "x" * 30_000_000}, "stop", "wire"),
    Shape("stop-string-over-the-model-limit", CHAT, lambda: {"messages": HI, "stop": ["a", "x" * 1000]},
          "stop[1]", "ingress"),
    Shape("2M-logit-bias", CHAT, lambda: {"messages": HI, "logit_bias": {str(i): 1 for i in range(2_000_000)}},
          "logit_bias", "wire"),
    Shape("n-a-billion", CHAT, lambda: {"messages": HI, "n": 10**9}, "n", "wire"),
    Shape("n-over-the-model-limit", CHAT, lambda: {"messages": HI, "n": 100}, "n", "ingress"),
    # --- chat: tools and template variables ------------------------------------------------------------
    Shape("500k-tools", CHAT, lambda: {"messages": HI, "tools": [tool()] * 500_000}, "tools", "wire"),
    Shape("tool-schema-of-2M-values", CHAT, lambda: {"messages": HI, "tools": [tool(parameters={
        "type": "object", "properties": {f"p{i}": {} for i in range(2_000_000)}})]}, "tools", "wire"),
    Shape("25MB-tool-description", CHAT, lambda: {"messages": HI, "tools": [tool(description="x " * 12_500_000)],
                                                  **SHORT}, "tools", "ingress", CONTEXT),
    Shape("tool-description-beyond-the-context-small-body", CHAT, lambda: {
        "messages": HI, "tools": [tool(description="x" * 200_000)], **SHORT}, "tools", "replica", CONTEXT),
    Shape("25MB-template-variable-answered", CHAT, lambda: {
        "messages": HI, "chat_template_kwargs": {"unused": "x" * 25_000_000}, **SHORT}, None, "none"),
    # --- completions -------------------------------------------------------------------------------
    Shape("10M-empty-prompts", COMPLETIONS, lambda: {"prompt": [""] * 10_000_000}, "prompt", "wire"),
    Shape("15M-token-ids", COMPLETIONS, lambda: {"prompt": [1] * 15_000_000}, "prompt", "wire"),
    Shape("250-prompts-of-60k-token-ids", COMPLETIONS, lambda: {"prompt": [[1] * 60_000] * 250}, "prompt", "wire"),
    Shape("1M-token-ids-beyond-the-context", COMPLETIONS, lambda: {"prompt": [1] * 1_000_000}, "prompt",
          "ingress", CONTEXT),
    Shape("token-ids-beyond-the-context-small-body", COMPLETIONS, lambda: {"prompt": [[1] * 5, [1] * 2000]},
          "prompt[1]", "replica", CONTEXT),
    Shape("completions-n-over-the-model-limit", COMPLETIONS, lambda: {"prompt": "hi", "n": 100}, "n", "ingress"),
    # --- responses ---------------------------------------------------------------------------------
    Shape("900k-input-items", RESPONSES, lambda: {"input": [user()] * 900_000}, "input", "wire"),
    Shape("900k-input-parts", RESPONSES, lambda: {"input": [user([{"type": "input_text", "text": ""}] * 900_000)]},
          "input[0].content", "wire"),
    Shape("5M-include", RESPONSES, lambda: {"input": "hi", "include": ["x"] * 5_000_000}, "include", "wire"),
    Shape("responses-500k-tools", RESPONSES, lambda: {"input": "hi", "tools": [{"type": "function", "name": "f"}]
                                                      * 500_000}, "tools", "wire"),
    Shape("input-items-beyond-the-context", RESPONSES, lambda: {"input": [user()] * 3000, "max_output_tokens": 2},
          "input", "replica", CONTEXT),
)
