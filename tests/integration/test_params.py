"""Chat parameters over real HTTP and the `openai` SDK: every listed OpenAI / vLLM parameter is served,
accepted as metadata, or refused in one shape; text of any Unicode never causes a 5xx; routing errors
say what exists; integrations' failure modes (issue #8 items 4, 5, 10, 11) stay fixed."""

import json

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.openapi_schema import assert_valid

MODEL = "demo-chat"


def msgs(text):
    return [{"role": "user", "content": text}]


def post(server, body, raw=None):
    """POST a chat body as ASCII JSON (a lone surrogate travels as a \\udXXX escape) or raw bytes."""
    data = raw if raw is not None else json.dumps(body)
    return requests.post(f"{server}/v1/chat/completions", data=data, timeout=60,
                         headers={"content-type": "application/json"})


def error_of(resp, status):
    assert resp.status_code == status, resp.text[:500]
    assert_valid(resp.json(), "ErrorResponse")
    return resp.json()["error"]


def greedy(server, **fields):
    resp = post(server, {"model": MODEL, "messages": msgs("hi"), "max_tokens": 8, "temperature": 0, **fields})
    assert resp.status_code == 200, resp.text[:500]
    assert_valid(resp.json(), "CreateChatCompletionResponse")
    return resp.json()


# --- item 4: Unicode ------------------------------------------------------------------------------

def test_lone_surrogate_in_a_prompt_is_a_400_not_a_500(server):
    err = error_of(post(server, None, raw=b'{"model": "demo-chat", "messages": [{"role": "user", '
                                          b'"content": "\\ud800"}], "max_tokens": 2}'), 400)
    assert (err["param"], err["code"]) == ("messages[0].content", "invalid_unicode")
    assert error_of(post(server, {"model": "\ud800", "messages": msgs("hi")}), 400)["param"] == "model"


SPECIAL = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\u202e", "\u200f", "\u0301", "\u0336", "\ufeff",
           "\uffff", "\U0001f600"]
# Joined lists, not st.text: st.text leaves surrogates out of any alphabet.
TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(SPECIAL)), max_size=12).map("".join)


def _lone(value) -> bool:
    """Whether ``value`` holds a string (or a dict key) with a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(value, dict):
        return any(_lone(k) or _lone(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone(v) for v in value)
    return False


@st.composite
def chat_bodies(draw):
    content = draw(st.one_of(TEXT, st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXT),
                                            min_size=1, max_size=2)))
    message = {"role": draw(st.sampled_from(["user", "system"])), "content": content}
    if draw(st.booleans()):
        message["name"] = draw(TEXT)
    body = {"model": MODEL, "messages": [message, {"role": "user", "content": draw(TEXT)}],
            "max_tokens": 2, "temperature": 0}
    for field, strategy in (("stop", st.lists(TEXT.filter(bool), min_size=1, max_size=2)), ("user", TEXT),
                            ("chat_template_kwargs", st.dictionaries(st.sampled_from(["a", "b"]), TEXT)),
                            ("metadata", st.dictionaries(TEXT.filter(lambda t: len(t) < 8), TEXT,
                                                         max_size=2))):
        if draw(st.booleans()):
            body[field] = draw(strategy)
    return body


@given(body=chat_bodies())
@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_any_unicode_in_text_fields_is_never_a_5xx(server, body):
    resp = post(server, body)
    assert resp.status_code < 500, f"{body!r} -> {resp.status_code} {resp.text[:300]}"
    # The oracle: invalid Unicode is exactly what is refused, as the server reads it: JSON joins a high and
    # a low surrogate escape that end up side by side ("\ud800\udc00") into one valid character.
    if _lone(json.loads(json.dumps(body))):
        assert error_of(resp, 400)["code"] == "invalid_unicode"
    else:
        assert resp.status_code == 200, f"{body!r} -> {resp.text[:300]}"
        assert_valid(resp.json(), "CreateChatCompletionResponse")


# --- item 5: every listed parameter is decided ---------------------------------------------------

SERVED = [  # implemented, or accepted as metadata: a valid answer
    {"logit_bias": {"5": 1.5}}, {"min_p": 0.1, "temperature": 1.0, "seed": 1}, {"min_tokens": 2},
    {"ignore_eos": True}, {"stop_token_ids": [3]}, {"echo": True}, {"chat_template_kwargs": {"x": 1}},
    {"add_generation_prompt": False}, {"best_of": 1}, {"store": True}, {"metadata": {"k": "v"}},
    {"service_tier": "auto"}, {"modalities": ["text"]}, {"logprobs": False}, {"tools": []},
    {"top_logprobs": None}, {"tool_choice": None}, {"response_format": {"type": "text"}},
]
REFUSED = [  # (fields, the parameter named, code)
    ({"logit_bias": {"999999": 1}}, "logit_bias", None),
    ({"top_logprobs": 3}, "top_logprobs", "invalid_parameter_combination"),
    ({"tool_choice": "auto"}, "tool_choice", "invalid_parameter_combination"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"best_of": 3}, "best_of", "unsupported_parameter"),
    ({"continue_final_message": True}, "continue_final_message", "invalid_parameter_combination"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids", None),
    ({"min_tokens": 9}, "min_tokens", None),
    ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs", None),
    ({"stream": "yes"}, "stream", None),
    ({"max_tokens": True}, "max_tokens", None),
]


@pytest.mark.parametrize("fields", SERVED, ids=lambda f: next(iter(f)))
def test_served_and_metadata_parameters_answer(server, fields):
    body = greedy(server, **fields)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("fields,param,code", REFUSED, ids=[next(iter(f)) for f, _, _ in REFUSED])
def test_refused_parameters_name_themselves(server, fields, param, code):
    err = error_of(post(server, {"model": MODEL, "messages": msgs("hi"), "max_tokens": 8, **fields}), 400)
    assert (err["param"], err["code"]) == (param, code), err


def test_metadata_does_not_change_the_answer(server):
    plain = greedy(server)["choices"][0]["message"]["content"]
    tagged = greedy(server, store=True, metadata={"team": "x"}, service_tier="default", user="u")
    assert tagged["choices"][0]["message"]["content"] == plain


def test_nan_and_infinity_literals_are_refused_saying_so(server):
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        raw = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": ' + \
            literal + b"}"
        err = error_of(post(server, None, raw=raw), 400)
        assert err["param"] == "temperature" and "NaN and Infinity" in err["message"], err


def test_logit_bias_min_tokens_ignore_eos_and_stop_token_ids_over_http(server):
    from transformers import AutoTokenizer

    from deployments.models.demo import demo_path

    tok = AutoTokenizer.from_pretrained(demo_path("chat"))
    target = tok("robot", add_special_tokens=False)["input_ids"][0]
    forced = greedy(server, logit_bias={str(target): 100})
    assert forced["choices"][0]["message"]["content"] == tok.decode([target] * 8)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    ended = greedy(server, logit_bias={str(eos): 100})
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["finish_reason"] == "stop"
    held = greedy(server, logit_bias={str(eos): 100}, min_tokens=4)
    assert held["usage"]["completion_tokens"] == 5 and held["choices"][0]["finish_reason"] == "stop"
    ignored = greedy(server, logit_bias={str(eos): 100}, ignore_eos=True)
    assert ignored["usage"]["completion_tokens"] == 8 and ignored["choices"][0]["finish_reason"] == "length"
    stopped = greedy(server, logit_bias={str(target): 100}, stop_token_ids=[target])
    assert stopped["choices"][0]["message"]["content"] == "" and stopped["usage"]["completion_tokens"] == 1
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_continue_final_message_and_echo(server, client):
    history = [{"role": "user", "content": "tell me a story"}, {"role": "assistant", "content": "Once upon"}]
    base = dict(model=MODEL, messages=history, max_tokens=8, temperature=0)
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    cont = client.chat.completions.create(**base, extra_body=extra).choices[0].message.content
    echoed = client.chat.completions.create(**base, extra_body={**extra, "echo": True})
    assert echoed.choices[0].message.content == "Once upon" + cont
    parts = list(client.chat.completions.create(**base, stream=True, extra_body={**extra, "echo": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "Once upon" + cont
    fresh = client.chat.completions.create(**base).choices[0].message.content
    assert cont != fresh or cont == ""  # a new assistant turn is another prompt
    with pytest.raises(openai.BadRequestError) as both:
        client.chat.completions.create(**base, extra_body={"continue_final_message": True})
    assert both.value.body["param"] == "continue_final_message"


# --- items 10 and 11: integrations ---------------------------------------------------------------

def test_unknown_model_is_404_whatever_the_body_holds(client):
    """instructor sends tools; a typo in the model must still say model_not_found."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="typo", messages=msgs("hi"), tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            response_format={"type": "json_object"})
    assert info.value.body["code"] == "model_not_found"


def test_model_of_another_task_is_not_found_like_openai(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="demo-whisper", messages=msgs("hi"))
    assert info.value.body["code"] == "model_task_mismatch" and info.value.body["param"] == "model"


def test_unknown_routes_name_themselves_and_list_the_routes(server, client):
    with pytest.raises(openai.NotFoundError) as images:  # an API this server does not have
        client.images.generate(model=MODEL, prompt="a cat")
    message = images.value.body["message"]
    assert "POST /v1/images/generations" in message and images.value.body["code"] == "unknown_route"
    for route in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses", "POST /v1/embeddings",
                  "POST /tokenize", "GET /v1/models"):
        assert route in message, route


def test_wrong_method_is_405_with_allow(server):
    resp = requests.get(f"{server}/v1/chat/completions", timeout=30)
    err = error_of(resp, 405)
    assert resp.headers["allow"] == "POST" and "GET" in err["message"]
    resp = requests.delete(f"{server}/v1/models", timeout=30)
    assert error_of(resp, 405) and "GET" in resp.headers["allow"]


@pytest.mark.parametrize("kwargs,param", [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]},
     "messages[0].content[1].type"),
    ({"messages": [{"role": "user", "content": "2+2?"},
                   {"role": "function", "name": "add", "content": "4"}]}, "messages[1].role"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
])
def test_unsupported_features_are_refused_in_one_shape(client, kwargs, param):
    kwargs = {"model": MODEL, "messages": msgs("hi"), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    body = info.value.body
    assert (body["param"], body["code"]) == (param, "unsupported_parameter"), body
    assert "not supported by this server" in body["message"]


def test_vllm_openai_rules_stream_options_and_tool_choice_need_their_partner(client):
    with pytest.raises(openai.BadRequestError) as options:
        client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=4,
                                       stream_options={"include_usage": True})
    assert options.value.body["param"] == "stream_options"
    for choice in ("bogus", "none", "auto"):
        with pytest.raises(openai.BadRequestError) as tool_choice:
            client.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=4,
                                           tool_choice=choice)
        assert tool_choice.value.body["param"] == "tool_choice"
