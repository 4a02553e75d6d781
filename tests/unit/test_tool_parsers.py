"""Tool-call formats (deployments/engines/tool_parsers.py) and the demo chat template's tool rendering.

Oracles: hand-written expected calls; the same output fed whole and split anywhere; llguidance itself
(the grammars accept real call texts token by token, reject wrong ones, and random walks through their
token masks decode to calls that ``jsonschema`` validates against the tools); the old ChatML template
string (the no-tools prompts must not change by a byte).
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deployments.engines.tool_parsers import TOOL_FORMATS

ID = re.compile(r"^call_[0-9a-f]{24}$")


def collect(fmt: str, chunks: list[str]) -> tuple[str, list[tuple[str, str]], int]:
    """Feed ``chunks`` then finish; return (content, [(name, arguments)] by index, parser.calls),
    checking the pieces' shape on the way: a call's first piece (only) has its id and name."""
    parser = TOOL_FORMATS[fmt].parser()
    content, calls = [], {}
    for text, pieces in [parser.feed(c) for c in chunks] + [parser.finish()]:
        content.append(text)
        for p in pieces:
            if p.index not in calls:
                assert ID.match(p.id) and p.name, p
                assert p.index == len(calls)
                calls[p.index] = [p.id, p.name, ""]
            else:
                assert p.id is None and p.name is None, p
            calls[p.index][2] += p.arguments
    ids = [c[0] for c in calls.values()]
    assert len(set(ids)) == len(ids)
    return "".join(content), [(name, args) for _, name, args in calls.values()], parser.calls


def parse(fmt: str, text: str):
    whole = collect(fmt, [text])
    assert collect(fmt, list(text)) == whole  # one character at a time gives the same
    return whole


def block(obj: str) -> str:
    return f"<tool_call>\n{obj}\n</tool_call>"


NESTED = '{"q": "a}b\\"c</tool_call>\\\\", "deep": [1, {"x": [true, null, -2.5e3]}], "u": "\\u00e9"}'

HERMES_CASES = [
    # (output, expected content, expected calls)
    ("Paris is the capital of France.", "Paris is the capital of France.", []),
    ("a < b and <tool_c is not a tag", "a < b and <tool_c is not a tag", []),
    ("  \n", "  \n", []),  # no calls: even whitespace is content
    (block('{"name": "get_weather", "arguments": {"city": "Paris"}}'), "",
     [("get_weather", '{"city": "Paris"}')]),
    (block('{"name": "a", "arguments": {}}') + "\n" + block('{"name": "b", "arguments": {"n": 1}}') + "\n",
     "", [("a", "{}"), ("b", '{"n": 1}')]),
    ("Let me look.\n" + block('{"name": "f", "arguments": {"k": 1}}'), "Let me look.\n", [("f", '{"k": 1}')]),
    ("\n\n" + block('{"name": "f", "arguments": {"k": 1}}') + "\n\nDone.", "\n\nDone.", [("f", '{"k": 1}')]),
    (block('{"name": "f", "arguments": ' + NESTED + "}"), "", [("f", NESTED)]),
    (block('{"arguments": {"city": "Oslo"}, "name": "get_weather"}'), "",
     [("get_weather", '{"city": "Oslo"}')]),  # arguments before the name
    (block('{"name": "f", "arguments": "{\\"city\\": \\"Rome\\"}"}'), "", [("f", '{"city": "Rome"}')]),
    (block('{"name": "f", "parameters": {"x": 2}}'), "", [("f", '{"x": 2}')]),
    (block('{"name":"f","arguments":{"x":[1,2]}}'), "", [("f", '{"x":[1,2]}')]),  # compact, as written
    (block('{"name": "f"}'), "", [("f", "{}")]),  # no arguments written
    ("<tool_call>" + '{"name": "f", "arguments": {}}</tool_call>', "", [("f", "{}")]),  # no newlines
    (block('{"name": "f", "arguments": {}}') + block('{"name": "g", "arguments": {}}'), "",
     [("f", "{}"), ("g", "{}")]),
    # Malformed before the name: the text is content, tags included.
    (block("not json") + " after", block("not json") + " after", []),
    (block('{"arguments": {}}'), block('{"arguments": {}}'), []),
    (block('{"name": 3, "arguments": {}}'), block('{"name": 3, "arguments": {}}'), []),
    (block('{"x": tru, "name": "f"}'), block('{"x": tru, "name": "f"}'), []),
    (block('["f"]'), block('["f"]'), []),
    # A tag that opens nothing, then a real call.
    ("<tool_call>\n" + block('{"name": "f", "arguments": {}}'), "<tool_call>\n", [("f", "{}")]),
    # Malformed after the name: the call stays as given, the rest of it is dropped.
    (block('{"name": "f", "arguments": {"a": [1}}') + "\nok", "\nok", [("f", '{"a": [1')]),
    # Cut by the end of the output.
    ('<tool_call>\n{"name": "f", "arguments": {"city": "Par', "", [("f", '{"city": "Par')]),
    ('Hm. <tool_call>\n{"arguments": {"city": "Par', 'Hm. <tool_call>\n{"arguments": {"city": "Par', []),
    ('<tool_call>\n{"na', '<tool_call>\n{"na', []),
    ("text <tool_ca", "text <tool_ca", []),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_', "", [("f", "{}")]),
    (block('{"name": "f", "arguments": {}}') + "\n</tool_", "\n</tool_", [("f", "{}")]),  # stray text
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_parses(text, content, calls):
    assert parse("hermes", text) == (content, calls, len(calls))


JSON_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", '{"city": "Paris"}')]),
    (' [{"name": "a", "arguments": {"n": 1}}, {"parameters": {}, "name": "b"}]\n', "",
     [("a", '{"n": 1}'), ("b", "{}")]),
    ("The answer is 4.", "The answer is 4.", []),
    ("  ", "  ", []),
    ("[1, 2]", "[1, 2]", []),
    ("[]", "[]", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
    ('{"name": "f", "parameters": {"a": "}"', "", [("f", '{"a": "}"')]),  # cut after the name
    ('{"parameters": {"a": 1', '{"parameters": {"a": 1', []),  # cut before it
    ('[{"name": "f", "parameters": {}}, 7]', "", [("f", "{}")]),  # a bad element after a call: dropped
    ('{"name": "f", "parameters": {}} I called f.', " I called f.", [("f", "{}")]),
]


@pytest.mark.parametrize("text,content,calls", JSON_CASES)
def test_json_parses(text, content, calls):
    assert parse("json", text) == (content, calls, len(calls))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(case=st.sampled_from([("hermes", c[0]) for c in HERMES_CASES] + [("json", c[0]) for c in JSON_CASES]),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_split_gives_the_same_result(case, cuts):
    fmt, text = case
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    chunks = [text[a:b] for a, b in zip(points, points[1:])]
    assert collect(fmt, chunks) == collect(fmt, [text])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(args=st.lists(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4), min_size=1, max_size=3),
       compact=st.booleans(), ascii_only=st.booleans(), data=st.data())
def test_any_arguments_come_back_as_written(args, compact, ascii_only, data):
    """Arbitrary JSON arguments (any strings, escapes, nesting), written either way, in any split."""
    seps = (",", ":") if compact else (", ", ": ")
    written = [json.dumps(a, separators=seps, ensure_ascii=ascii_only) for a in args]
    text = "\n".join(block('{"name": "f%d", "arguments": %s}' % (i, w)) for i, w in enumerate(written))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    points = sorted({0, len(text), *cuts})
    assert collect("hermes", [text[a:b] for a, b in zip(points, points[1:])]) == (
        "", [(f"f{i}", w) for i, w in enumerate(written)], len(args))


def test_arguments_stream_before_the_call_ends():
    parser = TOOL_FORMATS["hermes"].parser()
    content, pieces = parser.feed('Ok. <tool_call>\n{"name": "f", "arguments": {"a": [1, ')
    assert content == "Ok. " and parser.calls == 1
    assert [(p.index, p.name, p.arguments) for p in pieces] == [(0, "f", '{"a": [1, ')]
    _, pieces = parser.feed('2]}}\n</tool_call>')
    assert [(p.index, p.id, p.arguments) for p in pieces] == [(0, None, "2]}")]
    assert parser.finish() == ("", [])


def test_content_is_not_held_longer_than_a_possible_tag():
    parser = TOOL_FORMATS["hermes"].parser()
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("box>") == ("<toolbox>", [])


# --- grammars, with llguidance and the demo tokenizer -------------------------------------------------

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "description": "braces } { and quotes \" in text must not confuse %json",
           "properties": {"city": {"type": "string", "maxLength": 6},
                          "unit": {"enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["query", "filter"],
          "properties": {"query": {"type": "string", "maxLength": 8},
                         "filter": {"$ref": "#/$defs/Filter"}},
          "$defs": {"Filter": {"type": "object", "additionalProperties": False, "required": ["exact"],
                               "properties": {"exact": {"type": "boolean"},
                                              "tags": {"type": "array", "maxItems": 2,
                                                       "items": {"enum": ["a", "b"]}}}}}}
TOOLS = [{"name": "get_weather", "parameters": WEATHER}, {"name": "search", "parameters": SEARCH},
         {"name": "get", "parameters": {"type": "object", "additionalProperties": False,
                                        "properties": {}}}]


@pytest.fixture(scope="module")
def llg():
    """(llguidance, the demo chat tokenizer, its llguidance tokenizer)."""
    llguidance = pytest.importorskip("llguidance")
    import llguidance.hf
    import llguidance.torch  # noqa: F401  (the walks' masks)
    from transformers import AutoTokenizer

    from deployments.models.demo import demo_path

    tok = AutoTokenizer.from_pretrained(demo_path("chat"))
    return llguidance, tok, llguidance.hf.from_tokenizer(tok)


def matcher(llg, fmt, tools, parallel):
    llguidance, _, lltok = llg
    grammar = llguidance.LLMatcher.grammar_from_lark(TOOL_FORMATS[fmt].grammar(tools, parallel))
    assert llguidance.LLMatcher.validate_grammar(grammar, lltok) == ""
    return llguidance.LLMatcher(lltok, grammar, log_level=0)


def accepts(llg, fmt, tools, parallel, text) -> bool:
    m = matcher(llg, fmt, tools, parallel)
    return all(m.consume_token(t) for t in llg[1].encode(text, add_special_tokens=False)) and m.is_accepting()


def call_text(fmt, calls, parallel):
    """Calls as the grammar has them written (json: an array when parallel)."""
    objs = [json.dumps({"name": n, "arguments" if fmt == "hermes" else "parameters": a}) for n, a in calls]
    if fmt == "hermes":
        return "\n".join(block(o) for o in objs)
    return "[" + ", ".join(objs) + "]" if parallel else "".join(objs)


GOOD = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("search", {"query": "x", "filter": {"exact": True}}),
        ("get", {})]
BAD = [("get_time", {}), ("get_weather", {"city": "Copenhagen"}), ("get_weather", {"unit": "celsius"}),
       ("get_weather", {"city": "Oslo", "zone": 1}), ("search", {"query": "x", "filter": {"exact": 1}}),
       ("get", {"a": 1})]


@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
def test_grammar_accepts_calls_and_rejects_wrong_ones(llg, fmt):
    for call in GOOD:
        for parallel in (False, True):
            assert accepts(llg, fmt, TOOLS, parallel, call_text(fmt, [call], parallel)), call
    assert accepts(llg, fmt, TOOLS, True, call_text(fmt, GOOD, True))
    assert not accepts(llg, fmt, TOOLS, False, call_text(fmt, GOOD, True))  # one call only
    for call in BAD:
        assert not accepts(llg, fmt, TOOLS, True, call_text(fmt, [call], True)), call
    assert not accepts(llg, fmt, TOOLS, True, "Sure, " + call_text(fmt, GOOD[:1], True))  # calls only
    assert not accepts(llg, fmt, TOOLS[:1], True, call_text(fmt, GOOD[1:2], True))  # only the tools given


def walk(llg, m, rng: random.Random, cap: int = 400) -> list[int]:
    """Tokens chosen uniformly among those the matcher allows, until it stops or EOS is chosen."""
    llguidance, tok, lltok = llg
    bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    ids: list[int] = []
    while not m.is_stopped():
        assert len(ids) < cap, tok.decode(ids)
        llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)
        allowed = np.flatnonzero(np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little"))
        token = rng.choice(allowed.tolist())
        if token == tok.eos_token_id:
            break
        assert m.consume_token(token)
        ids.append(token)
    assert m.is_accepting()
    return ids


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
def test_random_walks_through_the_grammar_are_valid_calls(llg, fmt, parallel):
    rng, schemas = random.Random(27), {t["name"]: t["parameters"] for t in TOOLS}
    counts = set()
    for _ in range(10):
        text = llg[1].decode(walk(llg, matcher(llg, fmt, TOOLS, parallel), rng))
        content, calls, _ = collect(fmt, [text])
        assert content == "" and calls, text
        for name, args in calls:
            jsonschema.validate(json.loads(args), schemas[name])
        counts.add(len(calls))
    if parallel:
        assert max(counts) > 1  # the walks did make several calls
    else:
        assert counts == {1}


def test_a_tool_without_parameters_takes_any_object(llg):
    tools = [{"name": "ping"}, {"name": "pong", "parameters": None}]
    assert accepts(llg, "hermes", tools, False, block('{"name": "pong", "arguments": {"any": [1]}}'))
    assert not accepts(llg, "hermes", tools, False, block('{"name": "pong", "arguments": 1}'))


# --- the demo chat template ---------------------------------------------------------------------------

OLD_CHATML = (  # the template before tool calling: the oracle for prompts without tools
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": ""}],
    [{"role": "developer", "content": "d"}, {"role": "user", "content": "{{ '}}' }} <tool_call>"}],
]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                                 "parameters": WEATHER}}


@pytest.fixture(scope="module")
def chat_tokenizer():
    from transformers import AutoTokenizer

    from deployments.models.demo import demo_path

    return AutoTokenizer.from_pretrained(demo_path("chat"))


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_without_tools_is_unchanged(chat_tokenizer, messages, generation_prompt):
    render = chat_tokenizer.apply_chat_template
    assert (render(messages, tokenize=False, add_generation_prompt=generation_prompt)
            == render(messages, chat_template=OLD_CHATML, tokenize=False,
                      add_generation_prompt=generation_prompt))


def test_template_lists_tools_in_the_system_turn(chat_tokenizer):
    messages = CONVERSATIONS[1]
    text = chat_tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False,
                                              add_generation_prompt=True)
    assert text.count("<|im_start|>system\n") == 1 and text.startswith("<|im_start|>system\nBe brief.\n\n")
    listed = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(listed) == WEATHER_TOOL
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in text
    assert text.endswith("<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n")
    alone = chat_tokenizer.apply_chat_template(messages[1:], tools=[WEATHER_TOOL], tokenize=False)
    assert alone.startswith("<|im_start|>system\n# Tools\n")


@pytest.mark.parametrize("content", [None, "Let me check."])
def test_template_renders_a_tool_call_history(chat_tokenizer, content):
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},  # a JSON string
             {"id": "call_2", "type": "function",
              "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]  # a dict
    messages = [{"role": "user", "content": "Paris and Lyon?"},
                {"role": "assistant", "content": content, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "20C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "22C"}]
    text = chat_tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False,
                                              add_generation_prompt=True)
    turn = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    # The calls render as the model is asked to write them: the hermes parser reads them back.
    assert collect("hermes", [turn]) == ((content + "\n") if content else "",
                                         [("get_weather", '{"city": "Paris"}'),
                                          ("get_weather", '{"city": "Lyon"}')], 2)
    assert text.endswith("<|im_start|>user\n<tool_response>\n20C\n</tool_response>\n"
                         "<tool_response>\n22C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
