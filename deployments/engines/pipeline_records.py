"""Plain data the pipeline deployment streams to the ingress (standard library only: the ingress
unpickles these, and it never loads torch; ``tests/unit/test_layout.py`` checks).

A pipeline request answers with one :class:`PipelineResult` per input text. Its ``value`` is what
``transformers.pipeline(task)`` returns for that text alone, with records in place of dicts:

- ``fill-mask``: ``list[FillMaskPrediction]`` for a text with one mask token, else one such list per
  mask token, in text order (the pipeline's shape);
- (other tasks add their record here and their head in ``deployments/engines/pipeline_heads.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FillMaskPrediction:
    """One candidate for one mask token, as transformers' FillMaskPipeline reports it."""

    score: float  # probability of the token at the mask (softmax over the vocabulary, or its targets)
    token: int  # token id
    token_str: str  # the token decoded alone
    sequence: str  # the input with this token at the mask, decoded


@dataclass(frozen=True)
class PipelineResult:
    """The answer for input ``index`` of a request (see the module docstring for ``value``)."""

    index: int
    value: Any
