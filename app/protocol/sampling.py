"""Sampling parameters shared by the text-generation endpoints (chat completions, completions).

:class:`SamplingRequest` holds every generation setting the engine serves per row, validated the same way
for every endpoint family; ``deployments/engines/chat_params.generation_request`` turns them into engine
settings. Each family adds its own input fields (``messages``, ``prompt``) and refusals.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Sequence

from pydantic import Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from app.errors import InvalidRequest
from app.protocol.common import WireModel, conflict, unsupported
from app.protocol.structured import ResponseFormat, StructuredOutputs

Number = Annotated[float, Field(strict=True)]  # a JSON number (an int too), never a string or a bool

# Hard caps of the wire, whatever the model: they bound the work of validating a request (checked before
# its items are, so a 30 MB body of tiny items costs microseconds to refuse). The per-model limits
# (app/config.py GenerationLimits) are at most these and are checked before any template or tokenizer
# runs (:meth:`SamplingRequest.check_limits`).
MAX_LOGIT_BIAS = 300          # entries, as OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
MAX_N = 128                   # choices (limits.max_n is at most this)
MAX_STOP_SEQUENCES = 64       # stop strings (limits.max_stop_sequences is at most this)
MAX_STOP_CHARS = 4096         # characters of one stop string (limits.max_stop_chars is at most this)


def json_over(value: Any, max_values: int, max_depth: int) -> bool:
    """Whether JSON ``value`` holds more than ``max_values`` values or nests deeper than ``max_depth``,
    in O(max_values) whatever its size: a container's items are counted before they are visited."""
    stack, values = [(value, 0)], 1
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        values += len(children)
        if values > max_values or (children and depth >= max_depth):
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def too_long(param: str, message: str) -> PydanticCustomError:
    """A validation error for a request bigger than allowed, reported at ``param`` (a path below the
    validated field: ``"messages[3].content"`` from a model validator, ``"[2]"`` from a field's)."""
    return PydanticCustomError("too_long", "{message}", {"message": message, "at": param})


class StreamOptions(WireModel):
    include_usage: StrictBool = False


class SamplingRequest(WireModel):
    """Generation settings common to chat completions and completions. Booleans and integers are
    strict: ``"yes"`` is not true and ``true`` is not 1."""

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0.0, le=2.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, description="Extra: sample among the k likeliest; 0/-1 = off.")
    min_p: Number | None = Field(None, ge=0.0, le=1.0, description=(
        "Extra: drop tokens less likely than min_p times the likeliest."))
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="Extra: token ids that end the completion.")
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Number | None = Field(None, ge=0.01, le=10.0, description="Extra (HF-style).")
    logit_bias: dict[str, Annotated[Number, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias added to its logit.")
    min_tokens: StrictInt | None = Field(None, ge=0, description=(
        "Extra: EOS and stop_token_ids cannot end the completion before this many tokens."))
    ignore_eos: StrictBool = Field(False, description="Extra: keep generating past EOS.")
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N, description="Accepted only equal to n.")
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description=(
        "Extra (vLLM): constrain the output to a JSON schema, a regex, a choice or a grammar."))

    @field_validator("stop", mode="before")
    @classmethod
    def _bounded_stops(cls, value: Any) -> Any:
        """At most MAX_STOP_SEQUENCES strings of at most MAX_STOP_CHARS, counted before they are
        validated (a stop string's cost is paid at every decode step: see ``check_limits``)."""
        stops = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise too_long("", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        for i, stop in enumerate(stops):
            if isinstance(stop, str) and len(stop) > MAX_STOP_CHARS:
                raise too_long("" if isinstance(value, str) else f"[{i}]", f"a stop sequence may have at most "
                               f"{MAX_STOP_CHARS} characters, got {len(stop)}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        """The completion length the request asks for (None: the model's default)."""
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The parameter :attr:`requested_max_tokens` came from, for error messages."""
        return "max_tokens"

    @property
    def prompt_param(self) -> str:
        """The parameter that holds the prompt (``messages``, ``prompt``), for error messages."""
        raise NotImplementedError

    @property
    def constrained(self) -> bool:
        """Whether response_format or structured_outputs constrain the output."""
        format_ = self.response_format
        return self.structured_outputs is not None or (format_ is not None and format_.type != "text")

    @property
    def top_logprobs_asked(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_limits(self, limits: Any) -> None:
        """InvalidRequest naming the parameter where the request asks for more than the model's
        ``limits`` (a ``GenerationLimits``) allow: choices, stop strings (how many, how long),
        ``max_tokens``, and what the family adds (chat: messages). O(structure): no template, no
        tokenizer, so the ingress (before sending the request) and the replica (before rendering it) both
        apply it."""
        if self.n > limits.max_n:
            raise InvalidRequest(f"n must be at most {limits.max_n}, got {self.n}", param="n")
        stops = self.stop_list
        if len(stops) > limits.max_stop_sequences:
            raise InvalidRequest(f"at most {limits.max_stop_sequences} stop sequences are allowed, got "
                                 f"{len(stops)}", param="stop")
        # Held-back text is compared with every prefix of every stop string at each decode step.
        for i, stop in enumerate(stops):
            if len(stop) > limits.max_stop_chars:
                raise InvalidRequest(f"a stop sequence may have at most {limits.max_stop_chars} characters "
                                     f"with this model, got {len(stop)}",
                                     param="stop" if isinstance(self.stop, str) else f"stop[{i}]")
        asked, param = self.requested_max_tokens, self.max_tokens_param
        if asked is not None and asked > limits.max_tokens:
            raise InvalidRequest(f"{param} must be at most {limits.max_tokens}, got {asked}", param=param)

    def check_context(self, context_len: int, message_tokens: float = 0.0) -> None:
        """ContextLengthExceeded where the request's structure alone proves that its prompt cannot fit
        ``context_len`` tokens, ``message_tokens`` being a lower bound of the tokens each chat message
        renders to (``chat_params.message_tokens``). Default: nothing; chat counts messages, completions
        token-id prompts."""

    def text_size_over(self, limit_bytes: int) -> int | None:
        """The length in characters of the longest prompt whose UTF-8 encoding takes more than
        ``limit_bytes``, else None (see :func:`text_size_over`)."""
        return max((n for texts in self.prompt_texts() if (n := text_size_over(texts, limit_bytes)) is not None),
                   default=None)

    def prompt_texts(self) -> list[list[str]]:
        """Each prompt as the pieces of text it is made of (for :meth:`text_size_over`)."""
        raise NotImplementedError


def text_size_over(texts: list[str], limit_bytes: int) -> int | None:
    """The texts' total length in characters if their UTF-8 encoding takes more than ``limit_bytes``,
    else None. Cheap whatever the size: since len(str) <= UTF-8 bytes <= 4 * len(str), it encodes only
    text of at most ``limit_bytes`` characters."""
    chars = sum(map(len, texts))
    if chars > limit_bytes or (4 * chars > limit_bytes and sum(
            len(t.encode("utf-8", "surrogatepass")) for t in texts) > limit_bytes):
        return chars
    return None


# A refusal table: (parameter, refused (or invalid) when, why). Each family lists its own, these included.
Rule = tuple[str, Callable[[Any], bool], str]

# What every generation family refuses, and what it accepts only with another parameter.
SAMPLING_REFUSALS: tuple[Rule, ...] = (
    ("best_of", lambda r: r.best_of not in (None, r.n),
     "choosing the best of several completions is not implemented (best_of must equal n)"),
)
SAMPLING_CONFLICTS: tuple[Rule, ...] = (
    ("stream_options", lambda r: r.stream_options is not None and not r.stream,
     "'stream_options' is only allowed when 'stream' is true"),
    ("structured_outputs", lambda r: r.structured_outputs is not None and r.response_format is not None
     and r.response_format.type != "text",
     "'structured_outputs' and a 'response_format' other than text both constrain the output: give one"),
)


def refuse(request: Any, refusals: Sequence[Rule], conflicts: Sequence[Rule] = ()) -> None:
    """Raise the first rule ``request`` breaks: a refusal as ``unsupported_parameter``, then a conflict
    as ``invalid_parameter_combination`` (one shape for every family's refusals)."""
    for param, refused, reason in refusals:
        if refused(request):
            raise unsupported(param, reason)
    for param, broken, message in conflicts:
        if broken(request):
            raise conflict(param, message)
