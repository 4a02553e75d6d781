"""``/v1/completions`` wire models (OpenAI ``CreateCompletionRequest`` and ``CreateCompletionResponse``).

A prompt is a string, a list of strings, a list of token ids, or a list of such lists: each prompt gets
``n`` choices, numbered ``prompt_index * n + choice`` across the request as OpenAI does. Streamed and
non-streamed answers share one shape (``text_completion``); a streamed chunk's ``finish_reason`` is
null until its choice ends.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, Discriminator, Field, StrictBool, StrictInt, Tag, model_validator

from app.protocol.common import Usage
from app.protocol.sampling import SAMPLING_CONFLICTS, SAMPLING_REFUSALS, SamplingRequest, refuse
from app.protocol.structured import CompletionLogprobs

MAX_PROMPTS = 256  # prompts in one request: each is a separate generation, with n choices each

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


def _prompt_kind(value: Any) -> str:
    """The prompt's JSON shape, chosen by type, so that an error names the branch that applies."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return "list[list[int]]"
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "list[int]"
    return "list[str]"


Prompt = Annotated[Union[
    Annotated[str, Tag("str")],
    Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS), Tag("list[str]")],
    Annotated[TokenIds, Field(min_length=1), Tag("list[int]")],
    Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS),
              Tag("list[list[int]]")],
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
