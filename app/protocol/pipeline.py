"""Wire models of the pipeline tasks (pydantic only): the Hugging Face Inference API shape.

``POST /models/{model}`` takes ``{"inputs": ..., "parameters": {...}}``, as ``huggingface_hub``'s
``InferenceClient`` sends it (``fill_mask(text, top_k=..., targets=...)`` posts
``{"inputs": text, "parameters": {"top_k": ..., "targets": [...]}}``, leaving out unset parameters), and
answers with what ``transformers.pipeline(task)`` returns, as JSON. :data:`REQUESTS` maps a task to its
request model. The bounds here are sanity ceilings; each model's own (``limits`` in its config) are
checked by the serving (``app/serving/pipeline.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Field, StrictInt, Tag

from app.protocol.common import WireModel

MAX_INPUTS = 4096  # texts in one request (a model's limits.max_inputs is at most this useful)
MAX_TARGETS = 4096  # target words in one fill-mask request
MAX_TARGET_CHARS = 256  # a target is a word: only its first token counts anyway



def _kind(value: Any) -> str:
    return "list[str]" if isinstance(value, list) else "str"


# A string or a list of strings, the branch chosen by the JSON type so that an error names the branch
# that applies (the tags read as pydantic's own union tags, which app.errors leaves out of parameter paths).
Inputs = Annotated[Union[Annotated[str, Tag("str")],
                         Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS), Tag("list[str]")]],
                   Discriminator(_kind)]
Target = Annotated[str, Field(max_length=MAX_TARGET_CHARS)]
Targets = Annotated[Union[Annotated[Target, Tag("str")],
                          Annotated[list[Target], Field(min_length=1, max_length=MAX_TARGETS), Tag("list[str]")]],
                    Discriminator(_kind)]


class FillMaskParameters(WireModel):
    """``parameters`` of a fill-mask request (``FillMaskParameters`` of the Inference API)."""

    top_k: StrictInt | None = Field(None, ge=1, description=(
        "How many candidates to return per mask token (default 5; at most the model's "
        "limits.max_top_k, and at most the number of distinct targets when targets are given)."))
    targets: Targets | None = Field(None, description=(
        "Score only these words. A word that is not one token of the model's vocabulary counts as its "
        "first token (what transformers' FillMaskPipeline does, with a warning); words that tokenize to "
        "nothing are dropped."))

    def target_list(self) -> list[str] | None:
        return [self.targets] if isinstance(self.targets, str) else self.targets


class FillMaskRequest(WireModel):
    """A fill-mask request: one text or several, each with at least one mask token (``[MASK]`` for
    BERT; the model's own mask token in general)."""

    inputs: Inputs = Field(description="The text, or a list of texts, holding the mask token.")
    parameters: FillMaskParameters | None = Field(None, description="Optional; null = defaults.")

    @property
    def params(self) -> FillMaskParameters:
        return self.parameters or FillMaskParameters()

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class FillMaskOutputElement(BaseModel):
    """One candidate for one mask token (the Inference API's ``FillMaskOutputElement``)."""

    score: float = Field(description="Probability of the token at the mask.")
    token: int = Field(description="The token id.")
    token_str: str = Field(description="The token, decoded.")
    sequence: str = Field(description="The input with the token at the mask, decoded.")


# Request model of each pipeline task.
REQUESTS: dict[str, type[WireModel]] = {"fill-mask": FillMaskRequest}
