"""Structured output's parts alone: constraints compiled (and refused) against a real tokenizer, masks
applied to the right rows, logprobs from the distribution the token was drawn from."""

from __future__ import annotations

import json
import typing

import llguidance
import pytest
import torch

from app.config import ToolParser
from app.errors import InvalidRequest
from deployments.engines.grammar import Grammars, start_masks
from deployments.engines.records import SamplingParams
from deployments.engines.sampling import select_tokens
from deployments.engines.tool_parsers import TOOL_FORMATS


@pytest.fixture(scope="module")
def grammars():
    from transformers import AutoTokenizer

    from deployments.models.demo import demo_path

    tokenizer = AutoTokenizer.from_pretrained(demo_path("chat"))
    return Grammars(tokenizer, len(tokenizer) + 7)  # logits wider than the vocabulary, as models pad them


class Row:
    def __init__(self, matcher=None, params=None):
        self.matcher, self.params = matcher, params or SamplingParams(max_new_tokens=4, temperature=0.0)
        self.generator, self.output_ids = None, []


def test_the_config_names_every_tool_format():
    assert set(typing.get_args(ToolParser)) == set(TOOL_FORMATS)


@pytest.mark.parametrize("kind, value", [
    ("json_schema", {"type": "objectx"}),
    ("json_schema", {"type": "string", "minLength": 5, "maxLength": 1}),
    ("regex", "(unclosed"),
    ("grammar", "start: missing_rule"),
    ("grammar", "root ::= ("),
    ("json_schema", {"$ref": "#/$defs/missing"}),
])
def test_a_constraint_that_cannot_compile_is_a_400_naming_the_parameter(grammars, kind, value):
    with pytest.raises(InvalidRequest) as info:
        grammars.compile(kind, value, "the.param")
    assert info.value.param == "the.param" and "cannot be compiled" in info.value.message


def test_compiled_once_and_each_choice_gets_its_own_matcher(grammars):
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    grammar = grammars.compile("json_schema", schema, "p")
    assert grammars.compile("json_schema", json.loads(json.dumps(schema)), "p") is grammar
    one, two = grammars.matcher(grammar), grammars.matcher(grammar)
    tokens = grammars.tokenizer.tokenize_str('{"a": "x"}')
    assert all(one.consume_token(t) for t in tokens) and one.is_accepting()
    assert not two.is_accepting()  # untouched by the other's tokens


def test_json_is_laid_out_as_json_dumps_writes_it(grammars):
    matcher = grammars.matcher(grammars.compile("json_object", None, "p"))
    assert matcher.consume_tokens(grammars.tokenizer.tokenize_str('{"a": [1, 2]}'))
    tight = grammars.matcher(grammars.compile("json_object", None, "p"))
    assert not tight.consume_tokens(grammars.tokenizer.tokenize_str('{\n  "a": 1}'))  # no free whitespace


def test_masks_restrict_only_the_constrained_rows(grammars):
    grammar = grammars.compile("choice", ["yes", "no"], "p")
    rows = [Row(), Row(grammars.matcher(grammar)), Row()]
    logits = torch.randn(3, grammars.width)
    masks = start_masks(rows, grammars)
    assert masks.rows == [1]
    before = logits.clone()
    tokens, failed, _ = select_tokens(logits, rows, masks=masks)
    allowed = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    expected = {t for t in range(grammars.width) if grammars.tokenizer.decode_str([t]) and (
        "yes".startswith(grammars.tokenizer.decode_str([t])) or "no".startswith(grammars.tokenizer.decode_str([t])))}
    assert not failed and allowed and allowed <= expected
    assert tokens[1] in allowed and tokens[0] == int(before[0].argmax()) and tokens[2] == int(before[2].argmax())
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert start_masks([Row(), Row()], grammars) is None  # free batches pay nothing


def test_logprobs_are_the_drawn_distribution_before_truncation():
    logits = torch.randn(2, 50)
    greedy = Row(params=SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=3))
    sampled = Row(params=SamplingParams(max_new_tokens=4, temperature=0.5, top_k=2, logprobs=0, seed=1))
    sampled.generator = torch.Generator().manual_seed(1)
    tokens, _, logprobs = select_tokens(logits, [greedy, sampled])
    reference = torch.log_softmax(logits[0], dim=-1)
    chosen, top = logprobs[0]
    assert tokens[0] == int(logits[0].argmax()) and abs(chosen - float(reference[tokens[0]])) < 1e-6
    assert [t for t, _ in top] == reference.topk(3).indices.tolist()
    chosen, top = logprobs[1]  # temperature applied; the top-k cut is not
    assert abs(chosen - float(torch.log_softmax(logits[1] / 0.5, dim=-1)[tokens[1]])) < 1e-5 and top == []
    plain = Row()
    assert select_tokens(logits[:1], [plain])[2] == {}  # greedy rows pay for logprobs only when asked


def test_the_tool_formats_grammars_compile(grammars):
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
             {"name": "g", "parameters": None}]
    for name, fmt in TOOL_FORMATS.items():
        for parallel in (False, True):
            grammar = grammars.compile("lark", fmt.grammar(tools, parallel), "tool_choice")
            assert llguidance.LLMatcher.validate_grammar(grammar, grammars.tokenizer) == "", name


def test_strict_schemas_are_closed_and_forced_calls_win_over_a_response_format(grammars):
    from app.protocol.chat import ChatCompletionRequest
    from deployments.engines.structured_params import closed, constraint

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                               "properties": {"type": "integer"}},
              "$defs": {"D": {"type": "object"}}, "anyOf": [{"properties": {}}], "additionalProperties": True}
    out = closed(schema)
    assert out["additionalProperties"] is True  # said: kept
    assert out["properties"]["a"]["additionalProperties"] is False and "additionalProperties" not in out["properties"]
    assert out["properties"]["properties"] == {"type": "integer"}  # a property named "properties" is no schema map
    assert out["$defs"]["D"]["additionalProperties"] is False and out["anyOf"][0]["additionalProperties"] is False

    class Engine:
        tool_parser = "hermes"

    tool = {"type": "function", "function": {"name": "f", "strict": True,
                                             "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool], "tool_choice": "required",
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}})
    kind, grammar, param = constraint(request, Engine())
    assert (kind, param) == ("lark", "tool_choice") and '"additionalProperties": false' in grammar.replace(
        '"additionalProperties":false', '"additionalProperties": false')
    matcher = grammars.matcher(grammars.compile(kind, grammar, param))
    assert not matcher.consume_tokens(grammars.tokenizer.tokenize_str(
        '<tool_call>\n{"name": "f", "arguments": {"x": 1, "y": 2}}'))  # no extra key under strict
