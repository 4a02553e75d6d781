"""Per-request generation parameters inside a shared batch (engine alone, no Ray, no HTTP): logit_bias,
min_tokens, ignore_eos and stop_token_ids change their own row only; neighbours give their solo output."""

from collections import defaultdict

import pytest

from deployments.engines.detokenize import TextStream
from deployments.engines.records import GenerationRequest, SamplingParams
from tests.unit.conftest import collect, text_of

NEIGHBOURS = ["tell me a story about a robot who counts to ten", "one two", "Paris is the capital of"]


@pytest.fixture
def engine(demo_engine_factory, monkeypatch):
    """An engine that records every token it appends, by request id (deltas carry only tokens that
    released text, so they do not show every token)."""
    engine = demo_engine_factory()
    engine.chosen = defaultdict(list)
    append = engine._append

    def recording(seq, token, logprobs=None):
        engine.chosen[seq.request.request_id].append(token)
        return append(seq, token, logprobs)

    monkeypatch.setattr(engine, "_append", recording)
    return engine


def request(engine, prompt, **params):
    params.setdefault("max_new_tokens", 12)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(engine.tokenizer(prompt)["input_ids"], SamplingParams(**params))


async def run(engine, req):
    """(tokens chosen, deltas) of ``req`` run alone."""
    deltas = (await collect(engine, [req]))[0]
    return engine.chosen[req.request_id], deltas


async def in_a_crowd(engine, special):
    """Run ``special`` between a greedy and two sampled neighbours; check that the neighbours choose
    the tokens they choose alone, and return the special request's (tokens, deltas)."""
    def crowd():
        return [request(engine, NEIGHBOURS[0]), request(engine, NEIGHBOURS[1], temperature=1.0, seed=3),
                request(engine, NEIGHBOURS[2], top_k=5, temperature=0.8, seed=4)]

    alone = [(await run(engine, r))[0] for r in crowd()]
    first, *rest = neighbours = crowd()
    out = await collect(engine, [first, special, *rest])
    assert [engine.chosen[r.request_id] for r in neighbours] == alone, "a neighbour's output changed"
    return engine.chosen[special.request_id], out[1]


async def test_logit_bias_forces_a_token_greedy_and_sampled(engine):
    target = engine.tokenizer("robot", add_special_tokens=False)["input_ids"][0]
    for sampled in ({}, {"temperature": 1.0, "seed": 1}):
        chosen, deltas = await in_a_crowd(engine, request(engine, "hi", logit_bias=((target, 100.0),),
                                                          **sampled))
        assert chosen == [target] * 12 and deltas[-1].finish_reason == "length"
    first = (await run(engine, request(engine, "hi")))[0][0]
    chosen, _ = await in_a_crowd(engine, request(engine, "hi", logit_bias=((first, -100.0),)))
    assert first not in chosen  # -100 effectively bans a token


async def test_min_tokens_holds_eos_back_then_allows_it(engine):
    eos = min(engine.eos_token_ids)
    force_eos = ((eos, 100.0),)
    chosen, deltas = await run(engine, request(engine, "hi", logit_bias=force_eos))
    assert chosen == [eos] and deltas[-1].finish_reason == "stop"
    chosen, deltas = await in_a_crowd(engine, request(engine, "hi", logit_bias=force_eos, min_tokens=5))
    assert eos not in chosen[:5] and chosen[5:] == [eos]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == 6


async def test_ignore_eos_runs_to_max_tokens(engine):
    eos = min(engine.eos_token_ids)
    chosen, deltas = await in_a_crowd(engine, request(engine, "hi", logit_bias=((eos, 100.0),),
                                                      ignore_eos=True))
    assert chosen == [eos] * 12
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 12
    assert text_of(deltas) == ""  # EOS is a special token: it spells nothing


async def test_stop_token_ids_end_with_stop_and_emit_no_text_for_the_stop_token(engine):
    prompt = request(engine, NEIGHBOURS[0], max_new_tokens=16)
    solo, _ = await run(engine, prompt)
    stop_id = solo[4]
    k = solo.index(stop_id)  # its first occurrence
    chosen, deltas = await in_a_crowd(engine, request(engine, NEIGHBOURS[0], max_new_tokens=16,
                                                      stop_token_ids=(stop_id,)))
    assert chosen == solo[:k + 1]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == k + 1
    before = TextStream(engine.tokenizer, (), prompt.prompt_ids)
    expected = "".join(before.push(t) for t in solo[:k]) + before.finish()
    assert text_of(deltas) == expected  # the text up to the stop token, not the token's own


async def test_min_tokens_also_holds_stop_token_ids_back(engine):
    solo, _ = await run(engine, request(engine, NEIGHBOURS[0], max_new_tokens=16))
    chosen, _ = await in_a_crowd(engine, request(engine, NEIGHBOURS[0], max_new_tokens=16,
                                                 stop_token_ids=(solo[0],), min_tokens=3))
    assert solo[0] not in chosen[:3] and len(chosen) >= 3
