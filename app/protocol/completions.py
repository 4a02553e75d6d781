"""``/v1/completions`` wire models (OpenAI ``CreateCompletionRequest`` and ``CreateCompletionResponse``).

A prompt is a string, a list of strings, a list of token ids, or a list of such lists: each prompt gets
``n`` choices, numbered ``prompt_index * n + choice`` across the request as OpenAI does. Streamed and
non-streamed answers share one shape (``text_completion``); a streamed chunk's ``finish_reason`` is
null until its choice ends.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import (BaseModel, Discriminator, Field, StrictBool, StrictInt, Tag, ValidationInfo, field_validator,
                      model_validator)

from app.errors import ContextLengthExceeded
from app.protocol.common import Usage, WireModel
from app.protocol.sampling import SAMPLING_CONFLICTS, SAMPLING_REFUSALS, SamplingRequest, refuse, too_long
from app.protocol.structured import CompletionLogprobs

MAX_PROMPTS = 256  # prompts in one request: each is a separate generation, with n choices each
# Token ids in one request (all prompts together), whatever the model: more than any context holds. Each
# prompt longer than the model's context is refused before it is sent to the model (``check_context``).
MAX_PROMPT_TOKEN_IDS = 1 << 22

TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS)]


def _prompt_kind(value: Any) -> str:
    """The prompt's JSON shape, chosen by type (by the first item of a list: O(1) whatever its length;
    the branch then validates every item), so that an error names the branch that applies."""
    if isinstance(value, str):
        return "str"
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, list):
        return "list[list[int]]"
    if isinstance(first, int) and not isinstance(first, bool):
        return "list[int]"
    return "list[str]"


Prompt = Annotated[Union[
    Annotated[str, Tag("str")],
    Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS), Tag("list[str]")],
    Annotated[TokenIds, Tag("list[int]")],
    Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("list[list[int]]")],
], Discriminator(_prompt_kind)]


class CompletionRequest(SamplingRequest):
    """The request body: :class:`~app.protocol.sampling.SamplingRequest`'s parameters plus the prompt.
    ``max_tokens`` defaults to 16, as OpenAI's does; null means the model's ``default_max_tokens``."""

    prompt: Prompt
    max_tokens: StrictInt | None = Field(16, ge=1)
    echo: StrictBool = Field(False, description="Prefix each choice with its prompt.")
    suffix: str | None = Field(None, description="Refused unless empty: insertion is not implemented.")
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    add_special_tokens: StrictBool = Field(True, description=(
        "Extra (vLLM): let the tokenizer add its special tokens (e.g. BOS) to string prompts."))

    @field_validator("prompt", mode="before")
    @classmethod
    def _bounded_token_ids(cls, value: Any) -> Any:
        """At most MAX_PROMPTS prompts, and MAX_PROMPT_TOKEN_IDS token ids together, counted before any is
        validated (O(prompts))."""
        if isinstance(value, list) and value:
            if isinstance(value[0], (list, str)) and len(value) > MAX_PROMPTS:
                raise too_long("", f"at most {MAX_PROMPTS} prompts are allowed, got {len(value)}")
            nested = isinstance(value[0], list)
            total = sum(len(p) for p in value if isinstance(p, list)) if nested else len(value)
            if total > MAX_PROMPT_TOKEN_IDS:
                raise too_long("", f"at most {MAX_PROMPT_TOKEN_IDS} token ids are allowed, all prompts "
                               f"together, got {total}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        """WireModel's check of every text (overridden by name), skipping token-id prompts: ints hold
        no text, and walking 4 million of them took 5 s."""
        if info.field_name == "prompt" and isinstance(value, list) and not isinstance(value[0], str):
            return value
        return WireModel._valid_unicode(value)

    @model_validator(mode="after")
    def _refusals(self) -> "CompletionRequest":
        refuse(self, REFUSALS, SAMPLING_CONFLICTS)
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: strings, or token id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def prompt_param(self) -> str:
        return "prompt"

    @property
    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def prompt_param_of(self, k: int) -> str:
        """Where prompt ``k`` is (``prompt``, or ``prompt[k]`` in a list of prompts), for error messages."""
        nested = isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
        return f"prompt[{k}]" if nested else "prompt"

    def check_context(self, context_len: int, message_tokens: float = 0.0) -> None:
        """ContextLengthExceeded for a token-id prompt longer than the context: its length is its token
        count, no tokenizer needed."""
        for k, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str) and len(prompt) > context_len:
                param = self.prompt_param_of(k)
                raise ContextLengthExceeded(f"This model's maximum context length is {context_len} tokens, but "
                                            f"{param} has {len(prompt)} tokens.", param=param)

    def prompt_texts(self) -> list[list[str]]:
        """Each string prompt on its own: every prompt must fit the context, not their sum."""
        return [[p] for p in self.prompts if isinstance(p, str)]


# Parameters this server does not implement: (parameter, refused when, why).
REFUSALS: tuple[tuple[str, Callable[[CompletionRequest], bool], str], ...] = (
    ("suffix", lambda r: bool(r.suffix), "inserting text before a suffix is not implemented"),
    ("echo", lambda r: r.echo and r.logprobs is not None,
     "logprobs of the echoed prompt's tokens are not implemented (use echo or logprobs)"),
    *SAMPLING_REFUSALS,
)

FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(BaseModel):
    """A streamed chunk and, collected, the response: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
