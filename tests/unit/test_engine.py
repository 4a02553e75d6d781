"""The engine alone (no Ray, no HTTP): batching, continuous joins, sampling, stopping, cancellation."""

import asyncio

import pytest
import torch

from deployments.engines.records import GenerationRequest, SamplingParams
from tests.unit.conftest import collect, text_of

PROMPTS = ["hi", "tell me a story about a robot who counts to ten", "one two", "Paris is the capital of",
           "aaa", "What can I help you with? " * 6, "x", "def add(a, b):\n    return a + b"]


@pytest.fixture
def engine(demo_engine_factory):
    return demo_engine_factory()


def request(engine, prompt, **params):
    params.setdefault("max_new_tokens", 24)
    params.setdefault("temperature", 0.0)
    n = params.pop("n", 1)
    return GenerationRequest(engine.tokenizer(prompt)["input_ids"], SamplingParams(**params), n=n)


async def test_batched_equals_unbatched_greedy(engine):
    alone = [(await collect(engine, [request(engine, p)]))[0] for p in PROMPTS]
    together = await collect(engine, [request(engine, p) for p in PROMPTS])
    assert len({len(engine.tokenizer(p)["input_ids"]) for p in PROMPTS}) >= 6  # really mixed lengths
    for a, b in zip(alone, together):
        assert [t for d in a for t in d.token_ids] == [t for d in b for t in d.token_ids]
        assert text_of(a) == text_of(b)


async def solo_and_staggered(engine):
    """Each prompt's text decoded alone, then with the prompts joining the running batch 5 ms apart."""
    alone = [text_of((await collect(engine, [request(engine, p)]))[0]) for p in PROMPTS]

    async def join_later(i, prompt):
        await asyncio.sleep(0.005 * i)
        return text_of((await collect(engine, [request(engine, prompt)]))[0])

    return alone, await asyncio.gather(*(join_later(i, p) for i, p in enumerate(PROMPTS)))


async def test_requests_joining_a_running_batch_match_solo_output(engine):
    alone, staggered = await solo_and_staggered(engine)
    assert staggered == alone
    assert engine.running_rows == 0


async def test_rows_in_several_buckets_match_solo_output(engine, monkeypatch):
    """Joins that would pad the running rows start buckets of their own (deployments/engines/buckets.py)."""
    from deployments.engines import buckets

    monkeypatch.setattr(buckets, "SPLIT_PADDING", 0)
    seen = []
    decode = buckets.Buckets.decode
    monkeypatch.setattr(buckets.Buckets, "decode",
                        lambda self, *a: seen.append(len(self.batches)) or decode(self, *a))
    alone, staggered = await solo_and_staggered(engine)
    assert staggered == alone
    assert max(seen) > 1


async def test_seeded_sampling_is_reproducible_whatever_the_neighbours(engine):
    def seeded():
        return request(engine, "tell me a story", temperature=1.0, top_p=0.9, seed=1234)

    alone = text_of((await collect(engine, [seeded()]))[0])
    crowd = [request(engine, p, temperature=1.3) for p in PROMPTS[:5]]
    together = await collect(engine, [*crowd[:2], seeded(), *crowd[2:]])
    assert text_of(together[2]) == alone
    other_seed = text_of((await collect(engine, [request(engine, "tell me a story", temperature=1.0,
                                                          top_p=0.9, seed=99)]))[0])
    assert other_seed != alone


async def test_max_tokens_gives_length_and_exact_counts(engine):
    deltas = (await collect(engine, [request(engine, "hi", max_new_tokens=7)]))[0]
    last = deltas[-1]
    assert last.finish_reason == "length"
    assert last.completion_tokens == 7
    assert last.prompt_tokens == len(engine.tokenizer("hi")["input_ids"])
    assert sum(len(d.token_ids) for d in deltas) <= 7


async def test_stop_string_truncates_and_never_appears(engine):
    full = text_of((await collect(engine, [request(engine, PROMPTS[1], max_new_tokens=30)]))[0])
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    deltas = (await collect(engine, [request(engine, PROMPTS[1], max_new_tokens=30, stop=(stop,))]))[0]
    text = text_of(deltas)
    assert text == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


async def test_n_choices_are_independent_and_complete(engine):
    deltas = (await collect(engine, [request(engine, "hi", n=3, temperature=1.0, seed=7,
                                             max_new_tokens=10)]))[0]
    finals = [d for d in deltas if d.finish_reason]
    assert sorted(d.index for d in finals) == [0, 1, 2]
    texts = {text_of(deltas, i) for i in range(3)}
    assert len(texts) > 1  # distinct random streams per choice


async def test_cancelled_request_stops_consuming_steps(engine):
    long = request(engine, "hi", max_new_tokens=200)
    short = request(engine, "one two", max_new_tokens=40)
    seen = 0
    results = {}

    async def consume_short():
        results["short"] = await collect(engine, [short])

    task = asyncio.create_task(consume_short())
    async for deltas in engine.submit([long])[0]:
        seen += len(deltas)
        if seen >= 3:
            long.cancelled = True  # the caller walks away (the deployment sets this when it does)
            break
    tokens_at_cancel = engine.tokens_generated
    await task
    # The long request was dropped: the engine produced about the short request's tokens only.
    assert engine.tokens_generated - tokens_at_cancel <= 40 + 2
    assert results["short"][0][-1].finish_reason == "length"
    assert results["short"][0][-1].completion_tokens == 40
    assert engine.running_rows == 0


async def test_failing_request_fails_alone(engine, monkeypatch):
    bad = request(engine, "hi", max_new_tokens=8)
    good = request(engine, "one two", max_new_tokens=8)
    original = engine._append

    def flaky(seq, token, logprobs=None):
        if seq.request is bad:
            raise RuntimeError("boom")
        return original(seq, token, logprobs)

    monkeypatch.setattr(engine, "_append", flaky)
    out = await collect(engine, [bad, good])
    assert isinstance(out[0], Exception) and getattr(out[0], "status_code", None) == 500
    assert out[1][-1].finish_reason == "length" and out[1][-1].completion_tokens == 8


def test_length_groups_bound_padding_and_keep_choices_together(engine):
    from deployments.engines.prefill_groups import length_groups

    reqs = [request(engine, "x" * k, n=2 if k == 40 else 1) for k in (1, 2, 3, 40, 41, 300)]
    seqs = [type("S", (), {"request": r, "index": i})() for r in reqs for i in range(r.n)]
    groups = length_groups(seqs)
    assert sorted(len(s.request.prompt_ids) for g in groups for s in g) == sorted(
        len(s.request.prompt_ids) for s in seqs)
    for group in groups:
        lengths = {id(s.request): len(s.request.prompt_ids) for s in group}
        assert max(lengths.values()) * len(lengths) <= 1.25 * sum(lengths.values())
        for s in group:  # a request's choices are prefilled together
            assert all(t in group for t in seqs if t.request is s.request)


def test_packs_bound_tokens_and_keep_choices_together(engine):
    from deployments.engines.prefill_groups import PACK_TOKENS, packs

    reqs = [request(engine, "x" * k, n=2 if k == 40 else 1) for k in (1, 300, 40, 2, 700, 3, 200)]
    seqs = [type("S", (), {"request": r, "index": i})() for r in reqs for i in range(r.n)]
    groups = packs(seqs)
    assert [s for p in groups for s in p] == seqs  # every sequence once, in order
    for pack in groups:
        requests = list({id(s.request): s.request for s in pack}.values())
        assert len(requests) == 1 or sum(len(r.prompt_ids) for r in requests) <= PACK_TOKENS
        for s in pack:  # a request's choices are prefilled together
            assert all(t in pack for t in seqs if t.request is s.request)
    assert len(groups) > 1 and any(len({id(s.request) for s in p}) > 1 for p in groups)


async def test_n_choices_share_one_prefill_and_greedy_choices_agree(engine):
    deltas = (await collect(engine, [request(engine, PROMPTS[1], n=3, max_new_tokens=12)]))[0]
    assert text_of(deltas, 0) == text_of(deltas, 1) == text_of(deltas, 2)
    solo = (await collect(engine, [request(engine, PROMPTS[1], max_new_tokens=12)]))[0]
    assert text_of(deltas, 0) == text_of(solo)


async def test_small_prefill_budget_still_gives_identical_output(demo_engine_factory):
    engine = demo_engine_factory(max_prefill_tokens=8)  # one request admitted per engine step
    alone = [text_of((await collect(engine, [request(engine, p)]))[0]) for p in PROMPTS]
    steps = engine.steps
    together = await asyncio.gather(*(collect(engine, [request(engine, p)]) for p in PROMPTS))
    assert [text_of(d[0]) for d in together] == alone
    # admitted one by one, interleaved with decode steps: 8 prefills + 24 decode steps or more
    assert engine.steps - steps >= len(PROMPTS) + 24


async def test_held_stream_coalesces_without_delaying_first_or_last_item(engine):
    plain = (await collect(engine, [request(engine, PROMPTS[1], max_new_tokens=40)]))[0]
    (stream,) = engine.submit([request(engine, PROMPTS[1], max_new_tokens=40)])
    loop = asyncio.get_running_loop()
    items, start = [], loop.time()
    async for deltas in stream:
        items.append((loop.time() - start, deltas))
        stream.hold(10.0)  # far longer than the whole generation: only the end may cut it short
    assert len(items) == 2  # the first token at once, then everything else when the request ended
    assert items[1][0] < 10.0
    assert [t for _, ds in items for d in ds for t in d.token_ids] == [t for d in plain for t in d.token_ids]
    assert items[-1][1][-1].finish_reason == "length"


async def test_held_stream_wakes_its_loop_only_for_the_first_item_and_the_end(engine, monkeypatch):
    """A reader in a hold wakes by its own timer: the model thread does not wake its loop per step
    (streams' module docstring), yet no output is lost and the last item never waits."""
    from deployments.engines import streams

    woken: list[int] = []
    wake = streams._wake
    monkeypatch.setattr(streams, "_wake", lambda ss: (woken.append(len(ss)), wake(ss)))
    plain = (await collect(engine, [request(engine, PROMPTS[2], max_new_tokens=40)]))[0]
    woken.clear()
    steps = engine.steps
    (stream,) = engine.submit([request(engine, PROMPTS[2], max_new_tokens=40)])
    items = []
    async for deltas in stream:
        items.append(deltas)
        stream.hold(10.0)
    assert engine.steps - steps >= 40
    assert len(items) == 2 and len(woken) <= 2  # the first token, then the end: not one per step
    assert [t for ds in items for d in ds for t in d.token_ids] == [t for d in plain for t in d.token_ids]

    woken.clear()
    (stream,) = engine.submit([request(engine, PROMPTS[2], max_new_tokens=40)])
    unheld = [deltas async for deltas in stream]  # a reader that never holds is woken as output comes
    assert len(woken) > 2 and len(unheld) > 2
    assert [t for ds in unheld for d in ds for t in d.token_ids] == [t for d in plain for t in d.token_ids]


async def test_an_idle_model_thread_ends_only_when_other_engines_share_the_process(demo_engine_factory,
                                                                                  monkeypatch):
    """An idle thread keeps its OpenMP team and slows the other engines' steps (generation's module
    docstring): beside another engine it ends after IDLE_EXIT_S, and the next request starts another."""
    import weakref

    from deployments.engines import generation

    monkeypatch.setattr(generation, "IDLE_EXIT_S", 0.05)
    monkeypatch.setattr(generation, "_ENGINES", weakref.WeakSet())  # only this test's engines
    alone = demo_engine_factory()
    first = text_of((await collect(alone, [request(alone, PROMPTS[1])]))[0])
    thread = alone._thread
    await asyncio.sleep(0.3)
    assert thread.is_alive() and alone._thread is thread  # alone in the process: kept

    other = demo_engine_factory()
    assert text_of((await collect(other, [request(other, PROMPTS[2])]))[0])
    await asyncio.sleep(0.3)
    assert not thread.is_alive() and alone._thread is None and other._thread is None
    assert text_of((await collect(alone, [request(alone, PROMPTS[1])]))[0]) == first  # a new thread
    assert alone._thread is not None and alone._thread is not thread

    other.close()  # alone again: the new thread stays
    await asyncio.sleep(0.3)
    assert alone._thread.is_alive()
    alone.close()


async def test_a_sliding_window_model_serves_prompts_of_different_lengths_together(demo_engine_factory):
    """Its batch cannot concatenate (transformers' sliding-window cache): requests admitted together are
    prefilled as one padded batch, each with the tokens it gets alone (a second length group used to
    fail every request of the step)."""
    from transformers import MistralConfig

    from deployments.engines.generation import GenerationEngine
    from tests.unit.test_fast_decode import tiny

    tokenizer = demo_engine_factory().tokenizer
    engine = GenerationEngine(tiny(MistralConfig, sliding_window=8), tokenizer, device=torch.device("cpu"),
                              eos_token_ids={2}, pad_token_id=0)
    assert not engine.can_concatenate and engine.fast_decoder is None
    prompts = [[5, 6], list(range(5, 65)), [7] * 9]

    def ask(prompt):
        return GenerationRequest(prompt, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))

    alone = [(await collect(engine, [ask(p)]))[0] for p in prompts]
    together = await collect(engine, [ask(p) for p in prompts])
    assert all(isinstance(d, list) for d in together), together
    assert [[t for d in r for t in d.token_ids] for r in together] == \
        [[t for d in r for t in d.token_ids] for r in alone]
    engine.close()


async def test_each_prefill_group_delivers_its_first_tokens_before_the_next_is_prefilled(engine, monkeypatch):
    """An admission is prefilled in several groups (packs); the first tokens of a group go to its streams
    at once, not after the admission's last group (a 4096-token admission took seconds on 2 CPUs, and
    its first groups' requests waited for all of it: TTFT p50 at 32 mixed clients 4.3-5.5 s before,
    2.5 s after)."""
    from deployments.engines import generation, prefill_groups

    monkeypatch.setattr(prefill_groups, "PACK_TOKENS", 8)  # every prompt below is a pack of its own
    events = []
    prefill = engine._batch_class.prefill
    monkeypatch.setattr(engine, "_batch_class", type("Logged", (engine._batch_class,), {
        "prefill": staticmethod(lambda *a, **k: (events.append("prefill"), prefill(*a, **k))[1])}))
    deliver = generation.deliver_threadsafe
    monkeypatch.setattr(generation, "deliver_threadsafe", lambda items: (events.append("deliver"), deliver(items))[1])
    prompts = PROMPTS[1:5]
    results = await collect(engine, [request(engine, p, max_new_tokens=2) for p in prompts])
    assert all(text_of(r) for r in results)
    prefills = [i for i, e in enumerate(events) if e == "prefill"]
    assert len(prefills) >= 3, events  # one admission, several groups
    assert all(events[i + 1] == "deliver" for i in prefills), events
