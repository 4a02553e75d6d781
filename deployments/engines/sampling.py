"""Per-row token selection for a batch whose rows have different sampling settings.

Each row is processed with its own settings only, so a request's output does not depend on its batch
neighbours: a constrained row's logits are first masked to what its grammar allows (``grammar.MaskJob``);
greedy rows take the argmax (after their penalties, logit_bias and min_tokens mask, if any); sampled rows
apply those, then temperature, top-k, top-p and min-p, and draw with the row's own ``torch.Generator``
(seeded from the request's ``seed``), so the same seed gives the same draw whatever else is in the batch.

Logprobs (rows that ask only) are the log-softmax of the distribution the token was drawn from before
truncation: after the grammar mask, penalties, logit_bias, the min_tokens ban and (sampled rows) the
temperature; before top-k, top-p and min-p. With none of these set they are the model's own
``log_softmax``. A disallowed token's -inf is reported as -9999.0, as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Collection, Protocol, Sequence

import torch

from deployments.engines.records import SamplingParams


class SamplingRow(Protocol):
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int]


Logprobs = tuple[float, list[tuple[int, float]]]  # the chosen token's logprob, the top (id, logprob)s
_FLOOR = -9999.0

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


def select_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Collection[int] = (),
                  masks: Any = None) -> tuple[list[int], dict[int, Exception], dict[int, Logprobs]]:
    """Choose the next token of every row. ``logits`` is [rows, vocab] for the last position; ``masks``
    (a ``grammar.MaskJob`` or None) restricts the constrained rows.

    Returns the tokens; by row index, the errors of rows that could not be sampled (their token is the
    argmax, to be discarded: one row's bad settings never fail its neighbours); and by row index, the
    logprobs of the rows that asked for them. A greedy row whose logits are not adjusted (penalties,
    logit_bias, min_tokens) and that wants no logprobs takes the shared vectorised argmax.
    """
    logits = logits.float()
    if masks is not None:
        masks.apply(logits)  # in place: a masked greedy row's argmax is then the shared one too
    chosen = torch.argmax(logits, dim=-1).tolist()  # one vectorised pass serves every plain greedy row
    failed: dict[int, Exception] = {}
    logprobs: dict[int, Logprobs] = {}
    for i, row in enumerate(rows):
        params = row.params
        banned = unfinishable(row, eos_token_ids)
        if params.greedy and not params.adjusts_logits and not banned and not params.wants_logprobs:
            continue
        try:
            chosen[i], logprobs_i = _sample_row(logits[i], row, banned)
        except Exception as exc:  # e.g. settings that make every probability NaN
            failed[i] = exc
            continue
        if logprobs_i is not None:
            logprobs[i] = logprobs_i
    return chosen, failed, logprobs


def _sample_row(logits: torch.Tensor, row: SamplingRow, banned: tuple[int, ...] = ()
                ) -> tuple[int, Logprobs | None]:
    params = row.params
    logits = apply_logit_bias(apply_penalties(logits, params, row.output_ids), params.logit_bias)
    if banned:
        kept = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
        # A grammar that allows only the end wins over min_tokens (the row could not go on otherwise).
        logits = kept if bool(torch.isfinite(kept).any()) else logits
    if not params.greedy:
        logits = logits / params.temperature
    report = _logprobs(logits, params.logprobs) if params.wants_logprobs else None
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        cut = filter_min_p(filter_top_k_top_p(logits, params.top_k, params.top_p), params.min_p)
        token = int(torch.multinomial(torch.softmax(cut, dim=-1).cpu(), 1, generator=row.generator))
    return token, None if report is None else report(token)


def _logprobs(logits: torch.Tensor, top: int):
    """The row's log-softmax, and a function of the chosen token giving its logprob and the ``top``
    likeliest (id, logprob) pairs (see the module docstring)."""
    logp = torch.log_softmax(logits, dim=-1)
    pairs: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logp, top)
        pairs = [(int(t), max(float(v), _FLOOR)) for t, v in zip(ids.tolist(), values.tolist())]
    return lambda token: (max(float(logp[token]), _FLOOR), pairs)
