"""The batch's in-place buffers (deployments/engines/batch.py) and the buckets of similar width that hold
the running batches (buckets.py) against each row decoded alone.

Rows join (narrower and wider than the running batch, past the row capacity), finish in any order and
are replaced by rows from the end, columns that become padding are dropped, buffers run out of room and
grow: through all of it every row's greedy tokens must be those of the same prompt decoded alone.
"""

import random

import pytest
import torch

from deployments.engines.batch import Batch
from deployments.engines.plain_batch import PlainBatch


@pytest.fixture(scope="module")
def model(demo_engine_factory):
    return demo_engine_factory().model


def alone(model, prompt, steps):
    with torch.inference_mode():
        batch, logits = PlainBatch.prefill(model, [0], [prompt], 0, torch.device("cpu"))
        tokens = [int(logits.argmax(-1))]
        for _ in range(steps - 1):
            batch.set_next(tokens[-1:])
            tokens.append(int(batch.decode(model).argmax(-1)))
    return tokens


def joins_and_finishes(model, seed, count, group_sizes, start=lambda batch: batch, fast=None, check=None):
    """Prompts of mixed lengths join a running batch in random groups while rows finish in any order;
    ``start`` wraps the first prefilled batch (later ones are concatenated into it), ``check`` sees the
    running batch after every step. Asserts every row's greedy tokens equal its prompt's alone."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.choice([1, 3, 9, 30, 70]))] for _ in range(count)]
    lengths = [rng.randint(2, 40) for _ in prompts]
    expected = [alone(model, p, n) for p, n in zip(prompts, lengths)]
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    waiting = list(range(len(prompts)))
    running = None
    with torch.inference_mode():
        while waiting or running is not None:
            joining = waiting and (running is None or rng.random() < 0.3)
            if joining:
                group = [waiting.pop(0) for _ in range(min(len(waiting), rng.choice(group_sizes)))]
                batch, logits = Batch.prefill(model, group, [prompts[i] for i in group], 0, torch.device("cpu"),
                                              fast)
            else:
                batch, logits = running, running.decode(model, fast)
            tokens = logits.argmax(-1).tolist()
            batch.set_next(tokens)
            for row, token in zip(batch.rows, tokens):
                got[row].append(token)
            batch = batch.filter([k for k, row in enumerate(batch.rows) if len(got[row]) < lengths[row]])
            if not joining:
                running = batch
            elif batch is not None:
                running = start(batch) if running is None else running.concatenate(batch)
            if running is not None and check is not None:
                check(running)
    assert [got[i] for i in range(len(prompts))] == expected


def test_joins_and_finishes_in_any_order_match_each_row_alone(model):
    def check(running):
        assert running.mask.shape == (len(running), running.geometry.end - running.geometry.start)
        assert bool(running.mask.any(dim=0)[0])  # no column of padding only is kept

    joins_and_finishes(model, seed=0, count=14, group_sizes=[1, 2, 3], check=check)


def test_repeated_prompts_share_one_prefill_and_decode_alike(model):
    prompt = [5, 6, 7, 8]
    with torch.inference_mode():
        batch, logits = Batch.prefill(model, ["a", "b", "c"], [prompt, [9, 10], prompt], 0,
                                      torch.device("cpu"))
        assert torch.equal(logits[0], logits[2])
        batch.set_next(logits.argmax(-1).tolist())
        step = batch.decode(model)
    assert torch.allclose(step[0], step[2], atol=1e-4) and int(step[0].argmax()) == int(step[2].argmax())


def test_the_cache_goes_by_the_forwards_own_keyword(model):
    """transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is removed in 5.40): the
    batch passes whichever the model's forward takes, so no deprecated keyword is ever used."""
    import warnings

    from deployments.engines.batch import _cache_keyword

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
            raise NotImplementedError

    assert _cache_keyword(OldStyle) == "past_key_values"
    assert _cache_keyword(type(model)) == "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        alone(model, [3, 4, 5], 3)
        with torch.inference_mode():
            batch, _ = Batch.prefill(model, [0, 1], [[3, 4], [5, 6, 7]], 0, torch.device("cpu"))
            batch.set_next([1, 2])
            batch.decode(model)


@pytest.mark.parametrize("lean", [False, True], ids=["forward", "lean"])
def test_buckets_of_different_widths_match_each_row_alone(model, monkeypatch, lean):
    """The same joins and finishes through Buckets (deployments/engines/buckets.py), splitting on
    nearly every join of another width: rows spread over several batches, decoded in one step (the lean
    step: one pass of products, attention per bucket), and buckets merge again as rows leave."""
    from deployments.engines import buckets
    from deployments.engines.fast_decode import fast_decoder

    monkeypatch.setattr(buckets, "SPLIT_PADDING", 8)
    counts = []

    def check(running):
        counts.append(len(running.batches))
        assert len(running) == len(running.rows) == sum(len(b) for b in running.batches)

    joins_and_finishes(model, seed=1, count=16, group_sizes=[1, 2], start=buckets.Buckets,
                       fast=fast_decoder(model) if lean else None, check=check)
    assert max(counts) >= 3  # several buckets at once ...
    assert any(b < a for a, b in zip(counts, counts[1:]))  # ... and fewer again later


def test_one_bucket_when_asked_for(model, monkeypatch):
    """The engine's setting for a model without the lean step: a join never starts a bucket."""
    from deployments.engines import buckets

    monkeypatch.setattr(buckets, "SPLIT_PADDING", 0)
    with torch.inference_mode():
        short, _ = Batch.prefill(model, [0], [[3, 4]], 0, torch.device("cpu"))
        long, _ = Batch.prefill(model, [1], [list(range(3, 40))], 0, torch.device("cpu"))
        short.set_next([5])
        long.set_next([6])
        assert len(buckets.Buckets(short, max_buckets=1).concatenate(long).batches) == 1
