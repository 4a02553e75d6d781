"""Tool-call formats: reading a model's output as tool calls, and the grammar that forces calls.

A format (a row of :data:`TOOL_FORMATS`, chosen per model) is how a model family writes its calls:

* ``hermes`` (Qwen2.5, Hermes and many others): ``<tool_call>\\n{"name": ..., "arguments": ...}\\n
  </tool_call>``, several calls separated by ``"\\n"``, possibly after some text;
* ``json`` (Llama 3.x): the whole output is one call object ``{"name": ..., "parameters": ...}`` or
  a JSON array of them.

``ToolFormat.parser()`` gives an incremental :class:`ToolCallParser` for one choice's output. Contract
of ``feed(text) -> (content, pieces)`` and ``finish() -> (content, pieces)``:

* Text outside calls is content, passed on as soon as it cannot be the start of a call (only a possible
  partial ``<tool_call>`` is held back). A whitespace-only stretch of content is dropped when a call
  follows it or when it comes after a call (but kept when the choice has no calls at all).
* Each call yields a first :class:`ToolCallDelta` with its ``index`` (0, 1, ... per choice), an ``id``
  (``call_`` + 24 hex digits) and its ``name`` as soon as the name is known, then its arguments in
  fragments as they arrive: the fragments join to exactly the JSON text of the arguments value as the
  model wrote it (``{}`` when it wrote none). ``arguments`` written before ``name`` are held until the
  name is known; a JSON *string* as the arguments value stands for its decoded content (given whole
  when the string ends); ``parameters`` is read as an alias of ``arguments``.
* A call that proves malformed (not a JSON object, invalid JSON, no string ``name``) before its first
  piece was given is content, tags included; after that, the rest of it is dropped. A call cut off by
  ``finish()`` keeps what was given (as OpenAI does for a length cut); one cut before its name is
  content. ``calls`` counts the calls given so far.
* The collected result (content joined; pieces grouped by index, arguments joined) does not depend on
  how the output was split into ``feed`` calls.

``ToolFormat.grammar(tools, parallel)`` is an llguidance Lark grammar whose language is exactly one
call (``parallel``: one or more) in the format, each to one of ``tools`` (``{"name", "parameters"}``;
no parameters means any object) with arguments valid against the tool's schema. Each tool's schema is
its own ``%json`` root (so its ``$ref``s resolve as written), behind a fixed ``{"name": "<name>", "``
prefix: the name always comes first, and JSON separators are fixed (``", "`` and ``": "``, as
``json.dumps`` and the chat templates write), so a weak model cannot wander into endless whitespace.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from deployments.engines.records import ToolCallDelta

ARGUMENT_KEYS = frozenset({"arguments", "parameters"})
_WS = " \t\n\r"
_CLOSERS = {"{": "}", "[": "]"}
_VALUE_START = frozenset('{["-0123456789tfn')
_SCALAR_END = frozenset(",}]" + _WS)
# Scanner outcomes for one character: it belongs to the call (None), it closed the call object, it is
# not part of the call (so the text from it on is read anew), or it made the call invalid.
_DONE, _REJECT, _BAD = "done", "reject", "bad"


class ToolCallParser(Protocol):
    """An incremental reader of one choice's output (see the module contract)."""

    calls: int

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]: ...

    def finish(self) -> tuple[str, list[ToolCallDelta]]: ...


class _Out:
    """What one ``feed``/``finish`` returns: content, and call pieces merged per consecutive index."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.pieces: list[list[Any]] = []  # [index, id, name, [argument fragments]]

    def header(self, index: int, name: str) -> None:
        self.pieces.append([index, "call_" + secrets.token_hex(12), name, []])

    def args(self, index: int, text: str) -> None:
        if not text:
            return
        if not self.pieces or self.pieces[-1][0] != index:
            self.pieces.append([index, None, None, []])
        self.pieces[-1][3].append(text)

    def result(self) -> tuple[str, list[ToolCallDelta]]:
        return "".join(self.content), [ToolCallDelta(index=i, id=id_, name=name, arguments="".join(f))
                                       for i, id_, name, f in self.pieces]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; JSON does not


def _loads(raw: str) -> Any:
    return json.loads(raw, parse_constant=_no_constants)


class _CallScanner:
    """Reads one call object a character at a time, giving its pieces to the parser as they are known.

    It tracks JSON strings, escapes and bracket nesting itself, so the arguments value is known to end
    at its closing bracket. Every top-level key and value is checked with ``json.loads`` when it ends.
    """

    def __init__(self, parser: _Parser) -> None:
        self.parser = parser
        self.state: Callable[[str], str | None] = self._open
        self.index: int | None = None  # set once the call's first piece is given
        self.key: str | None = None  # the key of the value being read
        self.held_args: str | None = None  # arguments that came before the name
        self.value: list[str] = []  # the key or value being read, raw
        self.stack = ""  # its open brackets
        self.args_seen = self.reading_key = False
        self.in_string = self.escape = self.streaming = False

    def feed(self, text: str) -> tuple[str | None, str]:
        """Consume ``text``: (None, "") when all of it belongs to the unfinished call, else the
        outcome (``_DONE``, ``_REJECT``, ``_BAD``) and the text after the call's part."""
        for i, ch in enumerate(text):
            outcome = self.state(ch)
            if outcome is not None:
                return outcome, text[i + (outcome != _REJECT):]
        return None, ""

    # -- states: each takes the next character ----------------------------------------------------
    def _open(self, ch: str) -> str | None:
        return None if ch in _WS else self._to(self._key_or_close) if ch == "{" else _REJECT

    def _key_or_close(self, ch: str) -> str | None:
        return self._close() if ch == "}" else self._key_next(ch)

    def _key_next(self, ch: str) -> str | None:
        return None if ch in _WS else self._begin(ch, key=True) if ch == '"' else _REJECT

    def _colon(self, ch: str) -> str | None:
        return None if ch in _WS else self._to(self._value_start) if ch == ":" else _REJECT

    def _value_start(self, ch: str) -> str | None:
        return None if ch in _WS else self._begin(ch, key=False) if ch in _VALUE_START else _REJECT

    def _scalar(self, ch: str) -> str | None:
        if ch not in _SCALAR_END:
            self._take(ch)
            return None
        return self._after_value(ch) if self._ended() else _REJECT

    def _nested(self, ch: str) -> str | None:
        """Strings (keys too), objects and arrays: ends at the closing quote or bracket."""
        if self.in_string:
            self._take(ch)
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
            if self.in_string or self.stack:
                return None
        elif ch in "}]":
            if not self.stack or _CLOSERS[self.stack[-1]] != ch:
                return _BAD  # a mismatched bracket (not passed on)
            self._take(ch)
            self.stack = self.stack[:-1]
            if self.stack:
                return None
        else:
            self._take(ch)
            self.stack += ch if ch in _CLOSERS else ""
            self.in_string = ch == '"'
            return None
        return None if self._ended() else _BAD

    def _after_value(self, ch: str) -> str | None:
        if ch in _WS:
            return None
        return self._to(self._key_next) if ch == "," else self._close() if ch == "}" else _REJECT

    # -- helpers ------------------------------------------------------------------------------------
    def _to(self, state: Callable[[str], str | None]) -> None:
        self.state = state
        return None

    def _begin(self, ch: str, key: bool) -> None:
        self.value, self.stack, self.reading_key = [], ch if ch in _CLOSERS else "", key
        self.in_string, self.escape = ch == '"', False
        # Arguments are passed on as written, except a string (its decoded content is given at its end).
        self.streaming = not key and self.key in ARGUMENT_KEYS and not self.args_seen and ch != '"'
        self._take(ch)
        return self._to(self._nested if ch in '{["' else self._scalar)

    def _take(self, ch: str) -> None:
        self.value.append(ch)
        if self.streaming and self.index is not None:
            self.parser._out.args(self.index, ch)

    def _ended(self) -> bool:
        """Check the key or value just read and act on it; False when it is not valid JSON (or a name
        that is not a string). Moves on to the next state."""
        raw = "".join(self.value)
        try:
            value = _loads(raw)
        except ValueError:
            return False
        self.streaming = False
        if self.reading_key:
            self.key, self.state = value, self._colon
            return True
        self.state = self._after_value
        if self.key == "name" and self.index is None:
            if not isinstance(value, str):
                return False
            self.index = self.parser._begin_call(value)
            if self.held_args is not None:
                self.parser._out.args(self.index, self.held_args)
        elif self.key in ARGUMENT_KEYS and not self.args_seen:
            self.args_seen = True
            text = value if raw[0] == '"' else raw
            if self.index is None:
                self.held_args = text
            elif raw[0] == '"':  # (anything else was passed on as it came)
                self.parser._out.args(self.index, text)
        return True

    def _close(self) -> str:
        if self.index is None:
            return _BAD  # an object without a name is no call
        if not self.args_seen:
            self.parser._out.args(self.index, "{}")
        return _DONE


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class _Parser:
    """Shared machinery: a state function consumes text and returns what it did not (read anew), and
    content goes through :meth:`_content`, which applies the whitespace rule."""

    def __init__(self) -> None:
        self.calls = 0
        self._out = _Out()
        self._held = ""  # text a state put back until more arrives
        self._ws = ""  # whitespace-only content not passed on yet
        self._has_text = False  # whether the current stretch of content has non-whitespace
        self._scanner: _CallScanner | None = None
        self._raw: list[str] = []  # text read as call(s) and not given yet: content if it fails early
        self._state: Callable[[str], str]  # set by the subclass

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Read the next piece of output; return the content and call pieces it completes."""
        self._out = _Out()
        text, self._held = self._held + text, ""
        while text:
            text = self._state(text)
        return self._out.result()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The output ended: pass on what was held (see the module contract for cut-off calls)."""
        self._out = _Out()
        self._flush()
        if not self.calls:
            self._out.content.append(self._ws)
        self._ws = self._held = ""
        return self._out.result()

    def _flush(self) -> None:
        raise NotImplementedError

    def _content(self, text: str) -> None:
        if not text:
            return
        if not self._has_text:
            if text.isspace():
                self._ws += text
                return
            text, self._ws, self._has_text = self._ws + text, "", True
        self._out.content.append(text)

    def _scan(self, text: str) -> tuple[str | None, str]:
        outcome, rest = self._scanner.feed(text)
        self._raw.append(text[:len(text) - len(rest)])
        return outcome, rest

    def _begin_call(self, name: str) -> int:
        """A call's name is known: give its first piece; whitespace before it is dropped."""
        index, self.calls = self.calls, self.calls + 1
        self._ws, self._has_text = "", False
        self._out.header(index, name)
        return index


class HermesParser(_Parser):
    """``<tool_call>\\n{json}\\n</tool_call>`` blocks among free text (Qwen2.5, Hermes)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._state = self._text

    def _text(self, text: str) -> str:
        at = text.find(self.OPEN)
        if at < 0:
            keep = _partial_suffix(text, self.OPEN)
            self._content(text[:len(text) - keep])
            self._held = text[len(text) - keep:]
            return ""
        self._content(text[:at])
        self._scanner, self._raw, self._state = _CallScanner(self), [self.OPEN], self._call
        return text[at + len(self.OPEN):]

    def _call(self, text: str) -> str:
        outcome, rest = self._scan(text)
        if outcome is None:
            return ""
        if outcome == _DONE:
            self._state = self._close
        elif self._scanner.index is None:  # malformed before its name: it was text after all
            self._content("".join(self._raw))
            self._state = self._text
        else:
            self._state = self._skip
        return rest

    def _close(self, text: str) -> str:
        """After the object: optional whitespace and the closing tag; anything else is read as text."""
        tail = text.lstrip(_WS)
        if tail.startswith(self.CLOSE):
            self._state = self._text
            return tail[len(self.CLOSE):]
        if self.CLOSE.startswith(tail):
            self._held = text
            return ""
        self._state = self._text
        return text

    def _skip(self, text: str) -> str:
        """The rest of a call that went wrong after its name: dropped up to the closing tag."""
        at = text.find(self.CLOSE)
        if at < 0:
            self._held = text[len(text) - _partial_suffix(text, self.CLOSE):]
            return ""
        self._state = self._text
        return text[at + len(self.CLOSE):]

    def _flush(self) -> None:
        if self._state == self._text:
            self._content(self._held)
        elif self._state == self._call and self._scanner.index is None:
            self._content("".join(self._raw))


class JsonParser(_Parser):
    """The whole output is one call object or a JSON array of them (Llama 3.x); otherwise content."""

    def __init__(self) -> None:
        super().__init__()
        self._array = False
        self._state = self._start

    def _skip_ws(self, text: str) -> str:
        body = text.lstrip(_WS)
        self._raw.append(text[:len(text) - len(body)])
        return body

    def _start(self, text: str) -> str:
        body = self._skip_ws(text)
        if body[:1] != "[":
            return self._element(body)
        self._raw.append("[")
        self._array, self._state = True, self._element
        return body[1:]

    def _element(self, text: str) -> str:
        body = self._skip_ws(text)
        if body[:1] != "{":
            return self._fail(body) if body else ""
        self._scanner, self._state = _CallScanner(self), self._object
        return body

    def _object(self, text: str) -> str:
        outcome, rest = self._scan(text)
        if outcome is None:
            return ""
        if outcome != _DONE:
            return self._fail(rest)
        self._state = self._separator if self._array else self._after
        return rest

    def _separator(self, text: str) -> str:
        body = self._skip_ws(text)
        if body[:1] not in (",", "]"):
            return self._fail(body) if body else ""
        self._raw.append(body[0])
        self._state = self._element if body[0] == "," else self._after
        return body[1:]

    def _after(self, text: str) -> str:
        self._content(text)
        return ""

    def _drop(self, text: str) -> str:
        return ""

    def _fail(self, rest: str) -> str:
        """Not (or no longer) calls: before any call everything is content; after one, dropped."""
        if self.calls:
            self._state = self._drop
            return ""
        self._state = self._after
        return "".join(self._raw) + rest

    def _flush(self) -> None:
        if not self.calls and self._state not in (self._after, self._drop):
            self._content("".join(self._raw))


# --- grammars ---------------------------------------------------------------------------------------

# Fixed JSON layout inside the arguments (see the module docstring).
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lark string literal


def _call_rules(tools: list[dict], key: str) -> str:
    """Lark rules: ``call`` is a call object to any one of ``tools``, name first."""
    if not tools:
        raise ValueError("a tool-call grammar needs at least one tool")
    rules = ["call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        schema = {**(tool.get("parameters") or {"type": "object"}), "x-guidance": _JSON_LAYOUT}
        head = '{"name": ' + json.dumps(tool["name"], ensure_ascii=False) + f', "{key}": '
        rules.append(f'call_{i}: {_lark(head)} args_{i} "}}"')
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    return "\n".join(rules) + "\n"


def hermes_grammar(tools: list[dict], parallel: bool) -> str:
    """One (``parallel``: one or more, "\\n"-separated) ``<tool_call>`` blocks and nothing else."""
    start = 'start: block ("\\n" block)*' if parallel else "start: block"
    return f'{start}\nblock: "<tool_call>\\n" call "\\n</tool_call>"\n' + _call_rules(tools, "arguments")


def json_grammar(tools: list[dict], parallel: bool) -> str:
    """One call object (``parallel``: a non-empty JSON array of them) and nothing else."""
    start = 'start: "[" call (", " call)* "]"' if parallel else "start: call"
    return f"{start}\n" + _call_rules(tools, "parameters")


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool calls: a parser for its output, a grammar to force calls."""

    parser: Callable[[], ToolCallParser]
    grammar: Callable[[list[dict], bool], str]


TOOL_FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat(parser=HermesParser, grammar=hermes_grammar),
    # Llama 3.x's own templates ask for {"name": ..., "parameters": ...}: the grammar writes that key.
    "json": ToolFormat(parser=JsonParser, grammar=json_grammar),
}
