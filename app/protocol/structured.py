"""Wire models of structured output and logprobs, shared by the generation families.

``response_format`` (OpenAI: ``text``, ``json_object``, ``json_schema``) and vLLM's
``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) ask for output
that a grammar enforces token by token (``deployments/engines/structured_params.py`` turns them into a
constraint). Logprobs come back in the shapes of OpenAI's chat (``ChatCompletionTokenLogprob``) and
completions (``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``) objects.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, model_validator

from app.protocol.common import WireModel, check_json_bounds

MAX_CHOICES = 1024         # structured_outputs.choice options
MAX_PATTERN_CHARS = 16384  # a regex or a grammar's text
MAX_SCHEMA_VALUES = 50_000  # JSON values in one schema (a tool's parameters, a response format's)
MAX_SCHEMA_DEPTH = 64

# A JSON schema as a request carries it: an object of bounded size and depth.
Schema = Annotated[dict[str, Any], AfterValidator(lambda v: check_json_bounds(v, MAX_SCHEMA_VALUES,
                                                                               MAX_SCHEMA_DEPTH))]


class JsonSchemaFormat(WireModel):
    """``response_format.json_schema``: the schema the answer must follow (``strict`` or not, it is
    always enforced here)."""

    name: str = Field("response", min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: Schema = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response format needs 'json_schema' (with its 'schema')")
        return self


class StructuredOutputs(WireModel):
    """Extra (vLLM's ``structured_outputs``): exactly one of these constrains the output."""

    json_: Schema | str | None = Field(None, alias="json", description="A JSON schema (or its text).")
    regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS, description=(
        "A Lark grammar (llguidance's dialect) or a GBNF one."))
    json_object: StrictBool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


# --- logprobs in answers ------------------------------------------------------------------------------

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    """OpenAI's ``ChatCompletionTokenLogprob``."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


def chat_logprobs(records: list[Any]) -> list[TokenLogprob]:
    """Engine ``TokenLogprob`` records as the chat shape."""
    return [TokenLogprob(token=r.token, logprob=r.logprob, bytes=list(r.bytes),
                         top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(b)) for t, b, lp in r.top])
            for r in records]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, ``text_offset`` in characters from the start of
    the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def extend(self, records: list[Any], offset: int) -> int:
        """Append engine ``TokenLogprob`` records whose text starts at ``offset``; the offset after them."""
        for r in records:
            self.tokens.append(r.token)
            self.token_logprobs.append(r.logprob)
            self.top_logprobs.append({t: lp for t, _, lp in r.top})
            self.text_offset.append(offset)
            offset += len(r.token)
        return offset
