"""Per-row token selection for a batch whose rows have different sampling settings.

Each row is processed with its own settings only, so a request's output does not depend on its batch
neighbours: greedy rows take the argmax (after their penalties, logit_bias and min_tokens mask, if any);
sampled rows apply those, then temperature, top-k, top-p and min-p, and draw with the row's own ``torch.Generator`` (seeded from the request's ``seed``), so the same seed
gives the same draw whatever else is in the batch.
"""

from __future__ import annotations

from typing import Collection, Protocol, Sequence

import torch

from deployments.engines.records import SamplingParams


class SamplingRow(Protocol):
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int]


def make_generator(seed: int | None, choice_index: int) -> torch.Generator:
    """A CPU generator for one choice; choices of one seeded request get distinct, stable streams."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((seed * 1_000_003 + choice_index) % (2**63))
    return gen


def apply_penalties(logits: torch.Tensor, params: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """OpenAI presence/frequency penalties (subtracted from logits of tokens already generated) and the
    HF-style multiplicative repetition penalty, over the completion's tokens."""
    if not output_ids or not params.penalized:
        return logits
    ids = torch.tensor(output_ids, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
    seen = counts > 0
    logits = logits - params.frequency_penalty * counts - params.presence_penalty * seen.to(logits.dtype)
    if params.repetition_penalty != 1.0:
        rp = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k and outside the top-p nucleus of a 1-D logits row."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep a token if the mass before it is < top_p (so the first token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[0] = False  # a top_p that rounds to 0 in float32 must still keep the likeliest
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """OpenAI's logit_bias: add each bias to its token's logit (ids already checked against the vocab)."""
    if not bias:
        return logits
    ids, values = zip(*bias)
    return logits.index_add(0, torch.tensor(ids, device=logits.device),
                            torch.tensor(values, dtype=logits.dtype, device=logits.device))


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Mask the tokens whose probability is below ``min_p`` times the likeliest token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def unfinishable(row: SamplingRow, eos_token_ids: Collection[int]) -> tuple[int, ...]:
    """The tokens this row may not choose now: EOS and its stop_token_ids while the completion is
    shorter than ``min_tokens``."""
    params = row.params
    if len(row.output_ids) >= params.min_tokens:
        return ()
    return (*eos_token_ids, *params.stop_token_ids)


def select_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Collection[int] = ()
                  ) -> tuple[list[int], dict[int, Exception]]:
    """Choose the next token of every row. ``logits`` is [rows, vocab] for the last position.

    Returns the tokens and, by row index, the errors of rows that could not be sampled (their token is
    the argmax, to be discarded): one row's bad settings never fail its neighbours. A greedy row whose
    logits are not adjusted (penalties, logit_bias, min_tokens) takes the shared vectorised argmax.
    """
    logits = logits.float()
    chosen = torch.argmax(logits, dim=-1).tolist()  # one vectorised pass serves every plain greedy row
    failed: dict[int, Exception] = {}
    for i, row in enumerate(rows):
        params = row.params
        banned = unfinishable(row, eos_token_ids)
        if params.greedy and not params.adjusts_logits and not banned:
            continue
        try:
            chosen[i] = _sample_row(logits[i], row, banned)
        except Exception as exc:  # e.g. settings that make every probability NaN
            failed[i] = exc
    return chosen, failed


def _sample_row(logits: torch.Tensor, row: SamplingRow, banned: tuple[int, ...] = ()) -> int:
    params = row.params
    logits = apply_logit_bias(apply_penalties(logits, params, row.output_ids), params.logit_bias)
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    logits = filter_min_p(logits, params.min_p)
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=row.generator))
