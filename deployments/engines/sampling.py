"""Per-row token selection for a batch whose rows have different sampling settings.

Each row is processed with its own settings only, so a request's output does not depend on its batch
neighbours: greedy rows take the argmax; sampled rows apply penalties, temperature, top-k and top-p and
then draw with the row's own ``torch.Generator`` (seeded from the request's ``seed``), so the same seed
gives the same draw whatever else is in the batch.
"""

from __future__ import annotations

from typing import Protocol, Sequence

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


def select_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]
                  ) -> tuple[list[int], dict[int, Exception]]:
    """Choose the next token of every row. ``logits`` is [rows, vocab] for the last position.

    Returns the tokens and, by row index, the errors of rows that could not be sampled (their token is
    the argmax, to be discarded): one row's bad settings never fail its neighbours.
    """
    logits = logits.float()
    chosen = torch.argmax(logits, dim=-1).tolist()  # one vectorised pass serves every greedy row
    failed: dict[int, Exception] = {}
    for i, row in enumerate(rows):
        params = row.params
        if params.greedy and not params.penalized:
            continue
        try:
            chosen[i] = _sample_row(logits[i], row)
        except Exception as exc:  # e.g. settings that make every probability NaN
            failed[i] = exc
    return chosen, failed


def _sample_row(logits: torch.Tensor, row: SamplingRow) -> int:
    params = row.params
    logits = apply_penalties(logits, params, row.output_ids)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=row.generator))
