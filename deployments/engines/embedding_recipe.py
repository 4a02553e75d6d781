"""What a checkpoint's sentence-transformers files say happens after the transformer, and how to do it.

:func:`read_recipe` reads ``modules.json`` (the modules, in order) and each module's config
(``sentence_bert_config.json``: ``max_seq_length``, ``do_lower_case``; ``1_Pooling/config.json``: the pooling
modes, in the current ``pooling_mode`` form or the older one-flag-per-mode form; a ``Normalize`` module:
unit length). Without ``modules.json`` the recipe is what sentence-transformers builds for a plain
transformers checkpoint: mean pooling, no normalisation. A module not in :data:`MODULES` (``Dense``,
``LayerNorm``, ...) is refused, so a checkpoint is never served with a silently different vector.
:data:`POOLERS` implements each pooling mode over right-padded rows; :func:`max_input_length` decides the
longest input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

Pooler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden (B,T,H) f32, mask (B,T) f32) -> (B,H)


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)


def _mean_sqrt_len(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9).sqrt()


def _max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(mask[..., None] == 0, float("-inf")).max(1).values


def _cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]  # rows are right-padded: the first position is the first token


def _last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    last = mask.sum(1).long() - 1  # right padding: the last real token of each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _weighted_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Position weights 1, 2, 3, ... from the first token (rows are right-padded).
    weights = mask * torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=mask.dtype)
    return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-9)


POOLERS: dict[str, Pooler] = {"mean": _mean, "mean_sqrt_len_tokens": _mean_sqrt_len, "max": _max, "cls": _cls,
                              "lasttoken": _last, "weightedmean": _weighted_mean}
# sentence-transformers' older Pooling config: one flag per mode; several set = concatenated, in this order.
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class EmbeddingRecipe:
    """What happens after the transformer: pooling modes (concatenated in order), normalisation, and the
    sentence-transformers input settings."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    lower_case: bool = False


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _transformer(recipe: dict[str, Any], config: dict[str, Any]) -> None:
    recipe["max_seq_length"] = config.get("max_seq_length")
    recipe["lower_case"] = bool(config.get("do_lower_case", False))


def _pooling(recipe: dict[str, Any], config: dict[str, Any]) -> None:
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    unknown = [m for m in modes if m not in POOLERS]
    if unknown:
        raise ValueError(f"pooling mode(s) {unknown} are not implemented; known: {sorted(POOLERS)}")
    recipe["pooling"] = modes


def _normalize(recipe: dict[str, Any], config: dict[str, Any]) -> None:
    recipe["normalize"] = True


# sentence-transformers module class name -> what it sets in the recipe (its config file name, reader).
MODULES: dict[str, tuple[str, Callable[[dict[str, Any], dict[str, Any]], None]]] = {
    "Transformer": ("sentence_bert_config.json", _transformer),
    "Pooling": ("config.json", _pooling),
    "Normalize": ("config.json", _normalize),
}


def read_recipe(path: Path) -> EmbeddingRecipe:
    """The recipe of the checkpoint at ``path`` (see the module contract); ValueError names a module
    this engine cannot apply."""
    modules = _read_json(Path(path) / "modules.json")
    if not modules:
        return EmbeddingRecipe()
    recipe: dict[str, Any] = {}
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in MODULES:
            raise ValueError(f"{path}: sentence-transformers module {module.get('type')!r} (modules.json) is not "
                             f"supported; this server applies {', '.join(MODULES)}")
        filename, read = MODULES[kind]
        read(recipe, _read_json(Path(path) / module.get("path", "") / filename))
    return EmbeddingRecipe(**recipe)


def max_input_length(configured: int | None, recipe: EmbeddingRecipe, positions: int | None,
                     tokenizer_max: int | None) -> int:
    """The longest input in tokens: ``configured`` (the spec's limits.max_input_tokens), else the
    recipe's max_seq_length, else what the model can hold. What the model can hold is the smaller of its
    position embeddings and the tokenizer's model_max_length (RoBERTa's 514 positions hold 512 tokens);
    ValueError when ``configured`` exceeds it."""
    sane_tokenizer_max = tokenizer_max if tokenizer_max and tokenizer_max < 1_000_000 else None
    capacity = min(filter(None, (positions, sane_tokenizer_max)), default=None)
    if configured is not None:
        if capacity is not None and configured > capacity:
            raise ValueError(f"limits.max_input_tokens ({configured}) exceeds what the model holds ({capacity} "
                             "tokens)")
        return configured
    chosen = min(filter(None, (recipe.max_seq_length, capacity)), default=None)
    if chosen is None:
        raise ValueError("cannot tell the model's input length (no max_seq_length, position embeddings or "
                         "tokenizer model_max_length): set limits.max_input_tokens")
    return chosen
