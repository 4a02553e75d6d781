"""Plain data passed between the ingress, the model deployments and the engines.

These are dataclasses, not FastAPI or pydantic objects, so they pickle cheaply across Ray and the engines
can be tested without either. This module imports only the standard library: the ingress unpickles
these records, and it must never load torch (``tests/unit/test_layout.py`` checks).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation settings, already validated and defaulted."""

    max_new_tokens: int
    temperature: float = 1.0  # below GREEDY_BELOW (0 included) means greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_p: float = 0.0  # drop tokens below min_p x the likeliest token's probability (sampled rows)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids < vocab
    min_tokens: int = 0  # EOS and stop_token_ids are masked until the completion has this many tokens
    ignore_eos: bool = False  # EOS does not end the completion (it is generated like any token)
    stop_token_ids: tuple[int, ...] = ()  # these end the completion ("stop"); their text is not emitted
    logprobs: int | None = None  # None: none; k >= 0: each chosen token's logprob and its k likeliest

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32; the limit is argmax anyway.
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def adjusts_logits(self) -> bool:
        """Whether the row's logits change before a choice (so greedy is not the plain argmax)."""
        return self.penalized or bool(self.logit_bias)


@dataclass
class GenerationRequest:
    """One request: a tokenized prompt and ``n`` choices to generate for it.

    ``cancelled`` is set by the deployment when the caller goes away; the engine drops the request's
    sequences at its next step. ``grammar`` (an llguidance grammar, already validated against the
    model's tokenizer: ``deployments.engines.grammar``) constrains every choice's tokens to it.
    Records are made in the replica; ``images`` never travels to the ingress.
    """

    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    grammar: str | None = None
    # A vision-language model's image inputs for this prompt (the processor's tensors: pixel values and
    # the sizes the model needs), used at prefill only (deployments.engines.vision); None for text.
    images: dict | None = None
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))
    cancelled: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log probability and, when asked, the likeliest alternatives
    (``top``: ``(token, bytes, logprob)``, likeliest first). ``token`` is the token's text (invalid UTF-8
    replaced), ``bytes`` its exact bytes."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call: the first piece of call ``index`` has its ``id`` and ``name``; every
    piece may add a fragment of its JSON ``arguments`` (their concatenation is the whole)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    """New output of one choice. The last delta of a choice has ``finish_reason`` set, and with it the
    token counts for usage (``prompt_tokens`` is the request's, counted once per request by the
    caller; ``completion_tokens`` is this choice's). ``text`` is content; when the request has tools,
    what the model wrote as tool calls comes as ``tool_calls`` instead. ``logprobs`` (when asked) covers
    the tokens generated since the previous delta of this choice."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class Segment:
    """One transcript segment, times in seconds from the start of the audio."""

    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    words: list[tuple[str, float, float]] = field(default_factory=list)  # (word, start, end)


@dataclass
class WhisperOutput:
    """The transcript of one request: segments with absolute times, the language and the duration."""

    language: str  # ISO code
    language_name: str  # English name, as OpenAI's verbose_json reports it ("english")
    duration: float
    segments: list[Segment] = field(default_factory=list)
    temperature: float = 0.0
    prompt_tokens: int = 0
    audio_tokens: int = 0  # encoder positions: 1500 per 30 s window

    @property
    def output_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.segments)


@dataclass
class TokenizeResult:
    """``/tokenize``'s answer: the prompt's token ids (and their strings when asked for)."""

    tokens: list[int]
    max_model_len: int
    token_strs: list[str] | None = None


@dataclass
class DetokenizeResult:
    """``/detokenize``'s answer: the text the token ids spell."""

    prompt: str
