"""Structural bounds (issue "Reliability under abuse": requests cheap to send and costly to refuse).

The work a request can cause is bounded by its structure, not only its text: the wire's hard caps
(counted before the items are validated), the model's limits (``check_limits``) and what its context
proves (``check_context``, with :func:`~deployments.engines.chat_params.message_tokens`), all before the
chat template runs. Every shape of ``tests/structural_shapes.py`` goes through the real ingress app (over
a fake model handle that answers ``prompt_limits`` and records what it is sent) and, when it gets that
far, through the replica's preparation with the demo tokenizer; no Ray.
"""

from __future__ import annotations

import json
import random
import time
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from transformers import AutoTokenizer

from app.config import ChatModelSpec, GenerationLimits, IngressSpec
from app.errors import ContextLengthExceeded, InvalidRequest, ServingError
from app.ingress import OpenAIIngress, api
from app.protocol.chat import MAX_MESSAGES, ChatCompletionRequest
from app.protocol.completions import CompletionRequest
from app.protocol.responses import ResponsesRequest
from app.protocol.sampling import MAX_N, MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from deployments.engines.chat_params import (_arguments, message_tokens, prompt_bytes_limit, prompt_limits,
                                             renders_tools, to_generation_request)
from deployments.engines.preparers import prepare
from deployments.models.demo import demo_path
from tests.structural_shapes import BODY_LIMIT, CONTEXT_LEN, MODEL, SHAPES, Shape
from tests.unit.fake_ingress import OpenDoor
from tests.unit.test_prompt_size import CountingTokenizer

LIMITS = GenerationLimits(default_max_tokens=16, max_tokens=512, max_context_len=CONTEXT_LEN)  # the test app's
REQUEST_MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                  "/v1/responses": ResponsesRequest}
REACHED = "reached_the_replica"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_path("chat"))


@pytest.fixture(scope="module")
def engine(tokenizer):
    return SimpleNamespace(tokenizer=tokenizer, context_len=CONTEXT_LEN, vocab_size=len(tokenizer))


class Refused:
    """What the fake model's ``generate`` returns: a stream that fails at once (marking the request as
    having reached the replica)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise InvalidRequest("the request reached the replica", code=REACHED)

    def cancel(self) -> None:
        pass


class FakeModel:
    """A chat model's handle: its real ``prompt_limits`` (the demo tokenizer's); ``generate`` records
    the request it is sent."""

    def __init__(self, engine) -> None:
        self.engine, self.sent = engine, []

    def options(self, **kwargs):
        return self

    @property
    def prompt_limits(self):
        async def remote():
            return prompt_limits(self.engine)
        return SimpleNamespace(remote=remote)

    @property
    def generate(self):
        def remote(request):
            self.sent.append(request)
            return Refused()
        return SimpleNamespace(remote=remote)


@pytest.fixture(scope="module")
def model(engine):
    return FakeModel(engine)


@pytest.fixture(scope="module")
def http(model):
    user_class = OpenAIIngress.func_or_class.__mro__[1]  # under Serve's wrapper (whose __del__ is async)
    ingress = user_class.__new__(user_class)
    spec = ChatModelSpec(id=MODEL, source="unused", limits=LIMITS)
    ingress._specs, ingress._handles = {MODEL: spec}, {MODEL: model}
    ingress._on_demand, ingress._multiplexed, ingress._directory = None, None, None
    ingress._created, ingress._context_lens = 0, {MODEL: CONTEXT_LEN}
    ingress.settings, ingress.availability = IngressSpec(), OpenDoor()
    patch = pytest.MonkeyPatch()
    patch.setattr(api.state, "ingress", ingress, raising=False)
    patch.setattr(api.state, "settings", ingress.settings, raising=False)
    patch.setattr("ray.serve.get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    yield TestClient(api, raise_server_exceptions=False)
    patch.undo()


def compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_each_shape_is_refused_where_it_should_be(shape: Shape, http, model, engine):
    """Wire shapes fail their request model's validation (in well under a second, whatever their size);
    ingress shapes pass it but never reach the model; replica shapes reach it and are refused before
    the template runs (or, for rendered text, before the tokenizer); the others are served."""
    raw = compact(shape.body())
    assert len(raw) < BODY_LIMIT
    payload = json.loads(raw)
    started = time.perf_counter()
    try:
        REQUEST_MODELS[shape.route].model_validate(payload)
        failed = False
    except ValidationError:
        failed = True
    assert failed == (shape.refused_by == "wire"), shape.name
    assert time.perf_counter() - started < 2.0, shape.name
    del payload

    model.sent.clear()
    resp = http.post(shape.route, content=raw, headers={"content-type": "application/json"})
    error = resp.json()["error"]
    if shape.refused_by in ("wire", "ingress"):
        assert resp.status_code == 400 and not model.sent, (shape.name, error)
        assert error["param"] == shape.param, (shape.name, error)
        assert shape.code is None or error["code"] == shape.code, (shape.name, error)
        return
    assert error["code"] == REACHED and len(model.sent) == 1, (shape.name, error)
    started = time.perf_counter()
    if shape.refused_by == "none":
        prepare(model.sent[0], engine, LIMITS)
    else:
        with pytest.raises(ServingError) as caught:
            prepare(model.sent[0], engine, LIMITS)
        param = {"messages": "input"}.get(caught.value.param, caught.value.param) \
            if shape.route == "/v1/responses" else caught.value.param  # the ingress renames it
        assert param == shape.param and caught.value.status_code == 400, (shape.name, caught.value)
        assert shape.code is None or caught.value.code == shape.code, (shape.name, caught.value)
    assert time.perf_counter() - started < 2.0, shape.name


def test_messages_beyond_the_context_are_refused_without_rendering(tokenizer):
    counting = CountingTokenizer(tokenizer)
    each = message_tokens(counting)  # measured once per tokenizer and template, then cached
    assert 0 < each <= 2, each
    counting.calls = 0
    engine = SimpleNamespace(tokenizer=counting, context_len=CONTEXT_LEN, vocab_size=len(tokenizer))
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": ""}] * 3000)
    with pytest.raises(ContextLengthExceeded) as caught:
        to_generation_request(request, engine, LIMITS, counting)
    assert counting.calls == 0 and caught.value.param == "messages"
    assert "3000 messages take at least" in caught.value.message
    fits = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}] * 100, max_tokens=4)
    assert len(to_generation_request(fits, engine, LIMITS, counting).prompt_ids) > 100 * each


def test_tokenize_bounds_messages_as_chat_does(tokenizer):
    """/tokenize renders messages as chat does, so it is bounded alike: the wire counts them before any
    validates, the model's max_messages and the context refuse them before the template runs."""
    from app.protocol.tokenize import TokenizeRequest
    from deployments.engines.tokenize import run_tokenizer

    started = time.perf_counter()
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": ""}] * 900_000})
    assert time.perf_counter() - started < 0.5
    counting = CountingTokenizer(tokenizer)
    message_tokens(counting)
    counting.calls = 0
    engine = SimpleNamespace(tokenizer=counting, context_len=CONTEXT_LEN, vocab_size=len(tokenizer))
    for count, error, param in ((LIMITS.max_messages + 1, InvalidRequest, "messages"),
                                (3000, ContextLengthExceeded, "messages")):
        request = TokenizeRequest(model="m", messages=[{"role": "user", "content": ""}] * count)
        with pytest.raises(error) as caught:
            run_tokenizer(request, engine, LIMITS, counting)
        assert type(caught.value) is error and caught.value.param == param and counting.calls == 0, caught.value
    fits = TokenizeRequest(model="m", messages=[{"role": "user", "content": "hi"}] * 10)
    assert len(run_tokenizer(fits, engine, LIMITS, counting).tokens) > 10


ROLES = ("system", "developer", "user", "assistant", "tool")


def random_conversation(rng: random.Random) -> list[dict[str, Any]]:
    messages = []
    for _ in range(rng.randint(1, 30)):
        role = rng.choice(ROLES)
        content = rng.choice(["", "", "x", " ", "\n", "hello world", "<|im_end|>", "é🙂"])
        message = {"role": role, "content": content, **({"tool_call_id": "c"} if role == "tool" else {})}
        if role == "assistant" and rng.random() < 0.3:
            message["tool_calls"] = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        messages.append(message)
    return messages


def tokens(tokenizer, messages, **kwargs) -> int:
    request = ChatCompletionRequest(model="m", messages=messages, add_generation_prompt=False, **kwargs)
    engine = SimpleNamespace(tokenizer=tokenizer, context_len=10**6, vocab_size=len(tokenizer))
    return len(to_generation_request(request, engine, GenerationLimits(max_messages=100)).prompt_ids)


def test_the_message_bound_never_exceeds_what_conversations_take(tokenizer):
    """Property: (messages - 1) x message_tokens <= the rendered prompt's tokens, over random
    conversations of every role, empty and special-token contents, tool calls, with and without tools."""
    each, rng = message_tokens(tokenizer), random.Random(3)
    tools = [{"type": "function", "function": {"name": "f"}}]
    for _ in range(150):
        messages = random_conversation(rng)
        extra = {"tools": tools} if rng.random() < 0.3 else {}
        assert (len(messages) - 1) * each <= tokens(tokenizer, messages, **extra), messages


def test_a_role_that_renders_nothing_means_no_bound(tokenizer, monkeypatch):
    # Qwen2.5's template writes nothing for a role it does not know (developer, here): no lower bound.
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{% if m['role'] != 'developer' %}"
                        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    assert message_tokens(tokenizer) == 0.0


def test_a_template_that_refuses_orders_of_roles_is_measured_on_those_it_takes(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"))
    each = message_tokens(tokenizer)
    assert each >= 2  # <|im_start|> and <|im_end|>, at least, per message
    rng = random.Random(5)
    for _ in range(30):
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": rng.choice(["", "x", "a b"])}
                    for i in range(rng.randint(1, 40))]
        assert (len(messages) - 1) * each <= tokens(tokenizer, messages)


def test_no_tokenizer_no_bound():
    assert message_tokens(SimpleNamespace()) == 0.0
    assert renders_tools(SimpleNamespace()) is False


def random_tools(rng: random.Random) -> list[dict[str, Any]]:
    words = ["a", "city", "é", "🙂", "the unit", "x" * 40, "<|im_end|>", "\n"]
    return [{"type": "function", "function": {
        "name": f"f{k}", "description": " ".join(rng.choices(words, k=rng.randint(0, 30))),
        "parameters": {"type": "object", "properties": {
            f"p{j}": {"type": "string", "description": " ".join(rng.choices(words, k=rng.randint(0, 10)))}
            for j in range(rng.randint(0, 5))}}}} for k in range(rng.randint(1, 4))]


def test_the_tools_bound_never_refuses_tools_that_fit(tokenizer):
    """Property: a context exactly as long as the rendered prompt passes the tools' size bound."""
    assert renders_tools(tokenizer)
    rng = random.Random(11)
    for _ in range(60):
        request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                        tools=random_tools(rng))
        used = tokens(tokenizer, [{"role": "user", "content": "hi"}], tools=request.tools)
        assert request.tools_size_over(prompt_bytes_limit(tokenizer, used)) is None


def test_tools_a_template_does_not_write_do_not_count(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                        "{% for t in tools or [] %}{{ t['function']['name'] }}{% endfor %}")
    assert not renders_tools(tokenizer)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    tools=[{"type": "function", "function": {"name": "f", "description": "x" * 10**5}}])
    engine = SimpleNamespace(tokenizer=tokenizer, context_len=64, vocab_size=len(tokenizer))
    to_generation_request(request, engine, LIMITS)  # the description is never written: it fits


@pytest.mark.parametrize("fields,param", [
    ({"n": 9}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"stop": ["a", "x" * 257]}, "stop[1]"),
    ({"max_tokens": 4097}, "max_tokens"),
    ({"max_completion_tokens": 4097}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": ""}] * 4097}, "messages"),
])
def test_the_model_limits_name_the_parameter(fields, param):
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                    **fields})
    with pytest.raises(InvalidRequest) as caught:
        request.check_limits(GenerationLimits())
    assert caught.value.param == param and caught.value.status_code == 400
    request.check_limits(GenerationLimits(max_n=9, max_stop_sequences=5, max_stop_chars=257, max_tokens=4097,
                                          max_messages=4097))


def test_the_context_bounds_of_chat_and_completions():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": ""}] * 101)
    chat.check_context(200, 2.0)  # 100 x 2 = 200: may fit
    with pytest.raises(ContextLengthExceeded):
        chat.check_context(199, 2.0)
    chat.check_context(1, 0.0)  # no bound measured: nothing proven
    one = CompletionRequest(model="m", prompt=[1] * 65)
    one.check_context(65)
    with pytest.raises(ContextLengthExceeded) as caught:
        one.check_context(64)
    assert caught.value.param == "prompt"
    many = CompletionRequest(model="m", prompt=[[1], [1] * 64, [1] * 65])
    with pytest.raises(ContextLengthExceeded) as caught:
        many.check_context(64)
    assert caught.value.param == "prompt[2]"
    CompletionRequest(model="m", prompt=["x" * 100]).check_context(64)  # text: the size bound's (text_size_over)


@pytest.mark.parametrize("body,param", [
    ({"prompt": [[1]] * 257}, "prompt"),
    ({"prompt": ["a"] * 257}, "prompt"),
    ({"prompt": [[1] * (1 << 21)] * 3}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt[1]"),
    ({"prompt": ["a", 1]}, "prompt[1]"),
    ({"prompt": [True, 1]}, "prompt[0]"),
])
def test_completions_prompts_are_counted_before_they_are_validated(body, param):
    from app.errors import validation_error

    started = time.perf_counter()
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"model": "m", **body})
    assert validation_error(caught.value.errors()).param == param
    assert time.perf_counter() - started < 1.0


def test_token_id_prompts_are_not_walked_for_text():
    """The lone-surrogate check of every text skips token ids: 4 million of them took 5 s to walk."""
    started = time.perf_counter()
    CompletionRequest.model_validate({"model": "m", "prompt": [1] * 4_000_000})
    assert time.perf_counter() - started < 2.0
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["ok", "\ud800"]})


def test_the_config_caps_are_the_wire_caps():
    fields = GenerationLimits.model_fields

    def most(name: str) -> int:
        return next(m.le for m in fields[name].metadata if hasattr(m, "le"))

    assert most("max_messages") == MAX_MESSAGES and most("max_stop_chars") == MAX_STOP_CHARS
    assert most("max_stop_sequences") == MAX_STOP_SEQUENCES and most("max_n") == MAX_N


def test_deeply_nested_tool_arguments_reach_the_template_as_text():
    assert _arguments("[" * 100_000) == "[" * 100_000
    assert _arguments('{"a": 1}') == {"a": 1}
