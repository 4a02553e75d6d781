"""Metrics, layer by layer with the recorder replaced (the real scrape: tests/integration/test_metrics_api.py):
the engine's observer calls, the ingress's outcome accounting through respond(), the replica's
ReplicaTime mark, the gauges sampler, the pool's events."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from fastapi.responses import JSONResponse

from app import metrics as app_metrics
from app.errors import InvalidRequest, Overloaded
from app.metrics import METRICS, RequestMetrics
from app.streaming import ReplicaTime, respond, without_marks
from deployments import metrics as replica_metrics
from deployments.engines.records import GenerationRequest, SamplingParams
from tests.unit.conftest import collect


@pytest.fixture
def recorded(monkeypatch):
    """Every record() call as (name, value, labels), in order."""
    calls: list[tuple[str, float, dict]] = []

    def record(name, value, **labels):
        assert name in METRICS and set(labels) == set(METRICS[name].labels), (name, labels)
        calls.append((name, value, labels))

    monkeypatch.setattr(app_metrics, "record", record)
    monkeypatch.setattr(replica_metrics, "record", record)
    return calls


def by_name(calls):
    out = defaultdict(list)
    for name, value, labels in calls:
        out[name].append((value, labels))
    return out


class Observed:
    """An engine observer that keeps every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))

    def named(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


async def test_the_engine_reports_each_request_and_token(demo_engine_factory):
    engine = demo_engine_factory()
    engine.observer = observer = Observed()
    prompts = [engine.tokenizer(p)["input_ids"] for p in ("hello there", "one two three four")]
    requests = [GenerationRequest(prompts[0], SamplingParams(max_new_tokens=7, temperature=0.0)),
                GenerationRequest(prompts[1], SamplingParams(max_new_tokens=5, temperature=1.0, seed=3), n=3)]
    results = await collect(engine, requests)
    finished = [d for deltas in results for d in deltas if d.finish_reason]
    assert len(finished) == 4  # one per choice
    # Per request (a request's choices share its prompt): queue, prefill with its prompt tokens, first token.
    assert len(observer.named("queued")) == len(observer.named("first_token")) == 2
    assert sorted(tokens for _, tokens in observer.named("prefilled")) == sorted(map(len, prompts))
    # Per choice: one gap per token after its first, one finish with its counts.
    generated = sum(d.completion_tokens for d in finished)
    assert len(observer.named("inter_token")) == generated - len(finished)
    assert sorted(observer.named("finished")) == sorted((d.finish_reason, d.prompt_tokens, d.completion_tokens)
                                                         for d in finished)
    queued, prefill, first = (sum(v[0] for v in observer.named(n)) for n in ("queued", "prefilled", "first_token"))
    assert all(c[1] >= 0 for c in observer.calls if c[0] != "finished")
    assert first >= queued and first >= prefill  # the engine's TTFT holds its queue and prefill
    engine.close()


async def test_a_cancelled_request_reports_no_finish(demo_engine_factory):
    engine = demo_engine_factory()
    engine.observer = observer = Observed()
    request = GenerationRequest(engine.tokenizer("tell me")["input_ids"],
                                SamplingParams(max_new_tokens=500, temperature=0.0, ignore_eos=True))
    stream = engine.submit([request])[0]
    async for _ in stream:
        request.cancelled = True
        break
    await asyncio.sleep(0.2)
    assert observer.named("first_token") and not observer.named("finished")
    engine.close()


async def records(*lists, error=None):
    for items in lists:
        yield items
    if error is not None:
        raise error


async def answer(metrics, source, *, stream):
    """The ingress's path for one request: marks stripped, chunks = records, collected or streamed."""
    chunks = without_marks(source, {}, metrics)

    async def collect_all(chunks):
        return [c async for c in chunks]

    response = await respond(chunks, stream=stream, collect=collect_all, dump=lambda c: {"c": c},
                             render=lambda body: JSONResponse(body), on_end=metrics.end)
    if stream:
        return [part async for part in response.body_iterator]
    return response


@pytest.mark.parametrize("stream", [False, True])
async def test_a_complete_answer_counts_ttft_framework_share_latency_and_ok(recorded, stream):
    metrics = RequestMetrics("/v1/chat/completions", generates=True)
    metrics.model = "m"
    await answer(metrics, records([ReplicaTime(0.0), "a"], ["b"]), stream=stream)
    seen = by_name(recorded)
    labels = {"model": "m", "endpoint": "/v1/chat/completions"}
    assert [labels] == [l for _, l in seen["time_to_first_token_seconds"]]
    (ttft, _), = seen["time_to_first_token_seconds"]
    (share, _), = seen["framework_time_to_first_token_seconds"]
    assert share == pytest.approx(ttft)  # the replica reported 0 s of its own
    assert len(seen["e2e_request_latency_seconds"]) == 1
    assert seen["requests_total"] == [(1, {**labels, "outcome": "ok"})]
    assert not seen["request_errors_total"] and not seen["request_cancellations_total"]


async def test_an_endpoint_that_does_not_generate_has_no_ttft(recorded):
    metrics = RequestMetrics("/v1/embeddings", generates=False)
    await answer(metrics, records([ReplicaTime(0.5), "v"]), stream=False)
    seen = by_name(recorded)
    assert not seen["time_to_first_token_seconds"] and len(seen["framework_time_to_first_token_seconds"]) == 1
    assert seen["requests_total"] == [(1, {"model": "unknown", "endpoint": "/v1/embeddings", "outcome": "ok"})]


@pytest.mark.parametrize("stream", [False, True])
async def test_errors_count_once_by_code_and_overload_apart(recorded, stream):
    for error in (InvalidRequest("bad"), Overloaded("full")):
        metrics = RequestMetrics("/v1/completions", generates=True)
        source = records(["a"], error=error) if stream else records(error=error)
        try:
            await answer(metrics, source, stream=stream)
        except Exception as exc:
            assert exc is error and not stream
    seen = by_name(recorded)
    assert [l["code"] for _, l in seen["request_errors_total"]] == ["invalid_request_error", "overloaded"]
    assert len(seen["overload_rejections_total"]) == 1
    assert [l["outcome"] for _, l in seen["requests_total"]] == ["error", "error"]
    assert not seen["e2e_request_latency_seconds"]


async def test_a_client_leaving_a_stream_is_a_cancellation(recorded):
    metrics = RequestMetrics("/v1/chat/completions", generates=True)
    chunks = without_marks(records(["a"], ["b"], ["c"]), {}, metrics)
    response = await respond(chunks, stream=True, collect=None, dump=lambda c: {"c": c}, on_end=metrics.end)
    body = response.body_iterator
    await anext(body)
    await body.aclose()  # what Starlette does when the client goes away
    seen = by_name(recorded)
    assert len(seen["request_cancellations_total"]) == 1
    assert [l["outcome"] for _, l in seen["requests_total"]] == ["cancelled"]


async def test_the_replica_marks_its_first_list_with_its_own_seconds(recorded):
    class Deployment:
        spec = type("Spec", (), {"id": "m"})()

        @replica_metrics.timed
        async def generate(self, request):
            await asyncio.sleep(0.05)
            yield ["a"]
            yield ["b"]

    lists = [items async for items in Deployment().generate(None)]
    assert isinstance(lists[0][0], ReplicaTime) and lists[0][0].seconds >= 0.05
    assert lists[0][1:] == ["a"] and lists[1] == ["b"]
    (value, labels), = by_name(recorded)["replica_time_to_first_records_seconds"]
    assert value == lists[0][0].seconds and labels == {"model": "m"}


def test_the_sampler_sets_gauges_counts_new_tokens_and_zeroes_unloaded_models(recorded):
    class Engine:
        def __init__(self, generated):
            self.generated = generated

        def stats(self):
            return {"running_rows": 3, "max_running_rows": 64, "waiting_requests": 2,
                    "waiting_prefill_tokens": 40, "tokens_generated": self.generated}

    engine = Engine(10)
    engines = {"a": engine}
    sampler = replica_metrics._Sampler(lambda: dict(engines))
    sampler.sample()
    engine.generated = 25
    sampler.sample()
    engines.clear()
    sampler.sample()
    seen = by_name(recorded)
    assert [v for v, _ in seen["generation_tokens_total"]] == [10, 15]
    assert [v for v, _ in seen["num_running_rows"]] == [3, 3, 0]
    assert [v for v, _ in seen["num_waiting_prefill_tokens"]] == [40, 40, 0]


async def test_the_pool_reports_loads_failures_and_evictions():
    from deployments.pool import ModelPool

    class Loader:
        def prepare(self, spec):
            if spec.id == "broken":
                raise OSError("no such checkpoint")
            return None, 1

        def load(self, spec, prepared):
            return object(), 1

        async def unload(self, engine):
            pass

    events = Observed()
    pool = ModelPool(Loader(), max_models=1, observer=events)
    spec = lambda name: type("Spec", (), {"id": name})()  # noqa: E731
    async with pool.use(spec("a")):
        pass
    async with pool.use(spec("b")):  # room for one: a is evicted
        pass
    with pytest.raises(Exception):
        async with pool.use(spec("broken")):
            pass
    assert [c[0] for c in events.calls] == ["loaded", "evicted", "loaded", "load_failed"]
    assert events.calls[0][1] == "a" and events.calls[0][2] >= 0
    await pool.close()


def test_every_metric_is_in_the_readme_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Metrics\n"):readme.index("## Configuration\n")]
    assert [name for name in METRICS if f"`{name}`" not in section] == []
