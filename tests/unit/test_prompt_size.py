"""The cheap prompt-size bound (issue #8): a prompt too long for the context is refused without
tokenizing it, and no prompt that fits is ever refused by the bound."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from app.config import GenerationLimits
from app.errors import ContextLengthExceeded
from app.protocol.chat import ChatCompletionRequest
from deployments.engines.chat_params import _check_prompt_size, prompt_bytes_limit, to_generation_request


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from deployments.models.sources import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("demo:chat"))


class CountingTokenizer:
    """The demo tokenizer, counting the calls that do work proportional to the text."""

    def __init__(self, tokenizer) -> None:
        self.inner, self.calls = tokenizer, 0
        self.backend_tokenizer, self.chat_template = tokenizer.backend_tokenizer, tokenizer.chat_template
        self.added_tokens_decoder = tokenizer.added_tokens_decoder

    def get_vocab(self):
        return self.inner.get_vocab()

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def chat(*texts: str, **extra) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": t} for t in texts], **extra)


@pytest.mark.parametrize("text", ["a b " * (31 * 2**20 // 4), "é" * (8 * 2**20), "x" * 14000 + "🙂" * 900],
                         ids=["31MB-ascii", "16MB-latin", "emoji-tail"])
def test_a_prompt_too_long_by_size_is_refused_without_tokenizing(tokenizer, text):
    counting = CountingTokenizer(tokenizer)
    engine = SimpleNamespace(tokenizer=counting, context_len=256)
    with pytest.raises(ContextLengthExceeded) as err:
        to_generation_request(chat(text, max_tokens=8), engine, GenerationLimits())
    assert counting.calls == 0
    assert err.value.param == "messages" and err.value.code == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in err.value.message


def test_the_bound_counts_every_message_and_part(tokenizer):
    limit = prompt_bytes_limit(tokenizer, 64)
    half = "y" * (limit // 2 + 1)
    _check_prompt_size(chat(half), tokenizer, 64)  # one half fits the bound
    with pytest.raises(ContextLengthExceeded):
        _check_prompt_size(chat(half, half), tokenizer, 64)
    parts = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": half}, {"type": "text", "text": half}]}])
    with pytest.raises(ContextLengthExceeded):
        _check_prompt_size(parts, tokenizer, 64)


ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCXYZ0123456789", " \n\t  ", ".,;:!?-_()[]{}<>\"'/\\", "éèàüßçñøå",
    "абвгдежзий", "中文字符测试漢字", "日本語のテキスト", "🙂🚀👍🏽❤️", "\u0301\u0308\u200b", "<|im_start|><|im_end|>",
]


def random_text(rng: random.Random) -> str:
    pools = rng.sample(ALPHABETS, rng.randint(1, 4))
    pieces = []
    for _ in range(rng.randint(1, 60)):
        pool = rng.choice(pools)
        pieces.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 12))))
        pieces.append(rng.choice(["", " ", " ", "\n"]))
    return "".join(pieces)


def test_text_that_fits_is_never_refused_by_the_bound(tokenizer):
    """Property: tokens × longest-token-bytes >= UTF-8 bytes, so a context exactly as long as the
    prompt's tokens passes the size check, for random texts across scripts, emoji and specials."""
    rng = random.Random(8)
    for _ in range(300):
        text = random_text(rng)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert prompt_bytes_limit(tokenizer, tokens) >= len(text.encode("utf-8")), text
        _check_prompt_size(chat(text), tokenizer, max(tokens, 1))


def test_a_normalizer_widens_the_bound(tokenizer):
    """NFC (which the demo tokenizer has) can compose several characters into one, so a token then
    stands for more input bytes than its own text: the bound allows for it."""
    from tokenizers.normalizers import NFC

    assert isinstance(tokenizer.backend_tokenizer.normalizer, NFC)
    assert prompt_bytes_limit(tokenizer, 10) == 10 * 4 * max(len(t.encode()) for t in tokenizer.get_vocab())
    jamo = "\u1100\u1161\u11a8" * 200  # decomposed Hangul: 9 bytes that NFC makes one 3-byte syllable
    tokens = len(tokenizer(jamo, add_special_tokens=False)["input_ids"])
    _check_prompt_size(chat(jamo), tokenizer, tokens)
