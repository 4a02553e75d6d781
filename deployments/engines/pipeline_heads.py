"""The task heads of the pipeline engine: what each transformers pipeline task adds to the shared
tokenize -> pad -> one forward pass -> per-text answer path of ``deployments/engines/pipeline.py``.

:data:`HEADS` maps a task to its :class:`Head`:

- ``auto_class``: the transformers class that loads any checkpoint of the task;
- ``settings(params, engine)``: the request's validated settings (preprocessing thread; InvalidRequest
  naming the parameter for what the model cannot do);
- ``check(ids, index, engine)``: refuse one tokenized text, ``index`` None for a request of one text
  (preprocessing thread; :func:`input_at` words where);
- ``run(engine, batch, rows)``: the forward pass of one padded batch, returning one output per row;
- ``postprocess(engine, row, output, settings)``: a row's answer, the value of its
  :class:`~deployments.engines.pipeline_records.PipelineResult` (model thread).

The answers equal what ``transformers.pipeline(task)`` returns for each text alone (up to float rounding
from padding; ``tests/unit/test_pipeline_engine.py`` holds the engine to it). Adding a task: a head
here, its record in ``pipeline_records.py``, its request model in ``app/protocol/pipeline.py``, its spec
class in ``app.config.SPECS`` and a ``TASKS`` row in ``app/builder.py``. Text-classification would be
``AutoModelForSequenceClassification``, ``run`` returning each row's logits and ``postprocess`` the
pipeline's softmax / sigmoid / none by the config's ``problem_type`` and top_k; token-classification
``AutoModelForTokenClassification``, per-token logits and the pipeline's aggregation strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from app.errors import InvalidRequest
from deployments.engines.pipeline_records import FillMaskPrediction

DEFAULT_TOP_K = 5  # FillMaskPipeline's default


@dataclass(frozen=True)
class Head:
    """One pipeline task's part of the engine (see the module docstring)."""

    auto_class: str
    uses_mask_token: bool  # the tokenizer must have one; the logits are taken at its positions
    settings: Callable[[Any, Any], Any]
    check: Callable[[list[int], int | None, Any], None]
    run: Callable[[Any, dict[str, torch.Tensor], list[Any]], list[Any]]
    postprocess: Callable[[Any, Any, Any, Any], Any]


def input_at(index: int | None) -> tuple[str, str]:
    """(words for a message, the error's param) of input ``index`` (None: the request's only text)."""
    return ("", "inputs") if index is None else (f" at inputs[{index}]", f"inputs[{index}]")


# -- fill-mask ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FillMaskSettings:
    top_k: int
    target_ids: tuple[int, ...] | None = None  # in the order FillMaskPipeline puts them (list(set(ids)))


def fill_mask_settings(params: Any, engine: Any) -> FillMaskSettings:
    """``top_k`` (default 5) and the target token ids, as FillMaskPipeline resolves them: a target that
    is a vocabulary entry is that token; another is its first token (``bert-base-uncased``: "Paris" ->
    "paris", "zzzz" -> "z"); one with no token is dropped; 400 when none is left."""
    top_k = params.top_k if params.top_k is not None else DEFAULT_TOP_K
    targets = params.target_list()
    if targets is None:
        return FillMaskSettings(top_k=min(top_k, engine.vocab_size))
    ids = []
    for target in targets:
        token = engine.vocab.get(target)
        if token is None:
            pieces = engine.prep_tokenizer(target, add_special_tokens=False, return_attention_mask=False,
                                           return_token_type_ids=False, max_length=1,
                                           truncation=True)["input_ids"]
            if not pieces:
                continue
            token = pieces[0]
        ids.append(token)
    ids = list(set(ids))  # FillMaskPipeline's order: ties among targets resolve the same way
    if not ids:
        raise InvalidRequest("None of the targets is a token of this model's vocabulary, nor starts with "
                             "one.", param="parameters.targets")
    return FillMaskSettings(top_k=min(top_k, len(ids)), target_ids=tuple(ids))


def fill_mask_check(ids: list[int], index: int | None, engine: Any) -> None:
    if engine.mask_token_id not in ids:
        where, param = input_at(index)
        raise InvalidRequest(f"No mask token ({engine.mask_token}) found in the input{where}: put "
                             f"{engine.mask_token} where a word should be predicted.", param=param,
                             code="no_mask_token")


def fill_mask_run(engine: Any, batch: dict[str, torch.Tensor], rows: list[Any]) -> list[torch.Tensor]:
    """The logits at each row's mask positions, ``(masks, vocab)`` per row. Where the model allows it
    (checked once at load: :func:`narrow_logits_supported`), the vocabulary projection runs at the mask
    positions only, not at every token: it is the largest matrix of a BERT-style head, and its output
    (tokens x vocabulary floats) would otherwise be the largest tensor of the pass."""
    positions = torch.nonzero(batch["input_ids"] == engine.mask_token_id, as_tuple=True)
    if engine.narrow_logits:
        logits = logits_at(engine.model, batch, positions)
    else:
        logits = engine.model(**batch).logits[positions]
    counts = torch.bincount(positions[0], minlength=len(rows)).tolist()
    return list(torch.split(logits.float(), counts))


def logits_at(model: Any, batch: dict[str, torch.Tensor], positions: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``model(**batch).logits[positions]``, computing the output projection at ``positions`` only (a
    pre-hook on ``get_output_embeddings()`` hands it just those hidden states)."""
    def narrow(module: Any, args: tuple) -> tuple:
        return (args[0][positions], *args[1:])

    hook = model.get_output_embeddings().register_forward_pre_hook(narrow)
    try:
        return model(**batch).logits
    finally:
        hook.remove()


@torch.inference_mode()
def narrow_logits_supported(model: Any, mask_token_id: int, device: torch.device) -> bool:
    """Whether :func:`logits_at` equals the full forward on this model (probed on two rows; models that
    reshape the projection's output, or have none to hook, take the full forward)."""
    if model.get_output_embeddings() is None:
        return False
    ids = torch.arange(8, device=device).view(2, 4) % model.config.vocab_size
    ids[0, 1] = ids[1, 3] = mask_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    positions = torch.nonzero(ids == mask_token_id, as_tuple=True)
    try:
        narrow = logits_at(model, batch, positions)
    except Exception:  # the model's code after the projection expects every position
        return False
    full = model(**batch).logits[positions]
    return narrow.shape == full.shape and torch.allclose(narrow.float(), full.float(), atol=1e-4, rtol=1e-3)


def fill_mask_postprocess(engine: Any, row: Any, logits: torch.Tensor, settings: FillMaskSettings) -> list:
    """FillMaskPipeline.postprocess for one text: per mask, the top_k tokens by probability (softmax
    over the vocabulary, then restricted to the targets), each with the text decoded with it in place
    (special tokens kept when the text has several masks, as the pipeline does)."""
    probs = logits.softmax(dim=-1)
    target_ids = None
    if settings.target_ids is not None:
        target_ids = torch.tensor(settings.target_ids, device=probs.device)
        probs = probs[..., target_ids]
    values, predictions = probs.topk(settings.top_k)
    ids = row.ids
    mask_at = [i for i, token in enumerate(ids) if token == engine.mask_token_id]
    single = len(mask_at) == 1
    tokenizer, pad = engine.tokenizer, engine.pad_token_id
    result = []
    for at, scores, tokens in zip(mask_at, values.tolist(), predictions.tolist()):
        candidates = []
        for score, token in zip(scores, tokens):
            if target_ids is not None:
                token = settings.target_ids[token]
            filled = [token if i == at else t for i, t in enumerate(ids)]
            sequence = tokenizer.decode([t for t in filled if t != pad], skip_special_tokens=single)
            candidates.append(FillMaskPrediction(score=score, token=token, token_str=tokenizer.decode([token]),
                                                 sequence=sequence))
        result.append(candidates)
    return result[0] if single else result


FILL_MASK = Head(auto_class="AutoModelForMaskedLM", uses_mask_token=True, settings=fill_mask_settings,
                 check=fill_mask_check, run=fill_mask_run, postprocess=fill_mask_postprocess)

# The head of each pipeline task.
HEADS: dict[str, Head] = {"fill-mask": FILL_MASK}
