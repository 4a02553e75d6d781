"""Wire request -> prompt and SamplingParams (deployments/engines/chat_params.py) with the demo tokenizer."""

import pytest
from transformers import AutoTokenizer

from app.config import GenerationLimits
from app.errors import InvalidRequest
from app.protocol.chat import ChatCompletionRequest
from deployments.engines.chat_params import generation_request, render_prompt
from deployments.models.demo import demo_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_path("chat"))


def chat(*messages, **fields):
    msgs = [{"role": role, "content": content} for role, content in messages] or [
        {"role": "user", "content": "hi"}]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": msgs, **fields})


def text(tokenizer, request):
    return tokenizer.decode(render_prompt(tokenizer, request))


def test_generation_prompt_and_continuing_the_final_message(tokenizer):
    assert text(tokenizer, chat()).endswith("<|im_start|>assistant\n")
    assert text(tokenizer, chat(add_generation_prompt=False)).endswith("hi<|im_end|>\n")
    continued = text(tokenizer, chat(("user", "hi"), ("assistant", "Once upon"), add_generation_prompt=False,
                                     continue_final_message=True))
    assert continued.endswith("<|im_start|>assistant\nOnce upon")


def test_chat_template_kwargs_reach_the_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                        "{% if shout %}!!{% endif %}")
    assert text(tokenizer, chat()) == "hi"
    assert text(tokenizer, chat(chat_template_kwargs={"shout": True})) == "hi!!"


def test_a_template_that_renders_nothing_is_a_bad_request(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{% endfor %}")
    prompt = render_prompt(tokenizer, chat())
    assert prompt == []
    with pytest.raises(InvalidRequest) as info:
        generation_request(chat(), prompt, GenerationLimits(), 64)
    assert info.value.param == "messages" and "empty prompt" in info.value.message


@pytest.mark.parametrize("key", ["chat_template", "tokenize", "add_generation_prompt", "messages",
                                 "return_tensors", "tools"])
def test_chat_template_kwargs_cannot_set_the_call_itself(tokenizer, key):
    with pytest.raises(InvalidRequest) as info:
        render_prompt(tokenizer, chat(chat_template_kwargs={key: "{{ 7 * 7 }}"}))
    assert info.value.param == "chat_template_kwargs" and key in info.value.message


def params(request, vocab_size=100):
    return generation_request(request, [1, 2, 3], GenerationLimits(), 64, vocab_size=vocab_size).params


def test_extras_become_sampling_params():
    p = params(chat(logit_bias={"5": -100, "7": 3}, min_p=0.2, min_tokens=4, ignore_eos=True,
                    stop_token_ids=[9], max_tokens=10))
    assert p.logit_bias == ((5, -100.0), (7, 3.0)) and p.min_p == 0.2 and p.min_tokens == 4
    assert p.ignore_eos and p.stop_token_ids == (9,) and p.max_new_tokens == 10
    plain = params(chat())
    assert (plain.logit_bias, plain.min_p, plain.min_tokens, plain.ignore_eos, plain.stop_token_ids) == (
        (), 0.0, 0, False, ())


@pytest.mark.parametrize("fields,param", [
    ({"logit_bias": {"100": 1}}, "logit_bias"),
    ({"stop_token_ids": [0, 100]}, "stop_token_ids"),
    ({"min_tokens": 11, "max_tokens": 10}, "min_tokens"),
])
def test_token_ids_and_min_tokens_are_checked(fields, param):
    with pytest.raises(InvalidRequest) as info:
        params(chat(**fields))
    assert info.value.param == param and info.value.status_code == 400
