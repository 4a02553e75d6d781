"""The metrics as Prometheus scrapes them: Ray's real metrics endpoint of the session's node, after real
requests through the openai SDK. Values are compared as differences between two scrapes, so what other
tests sent before does not matter (the suite runs its tests one at a time)."""

from __future__ import annotations

import time

import pytest
import requests

from app.metrics import METRICS, PREFIX
from bench.metrics_scrape import parse_key, scrape_once
from deployments.engines.audio import encode_audio
from tests.integration.test_audio_api import speechlike

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels that matter), value} of our metrics and Ray Serve's, summed over the labels
    Ray adds per process (replica, worker, ...) and over histogram buckets (the tests read counts)."""
    keep = ("model", "endpoint", "outcome", "code", "finish_reason", "deployment")
    out = {}
    for key, v in scrape_once(url, ("ray_serve_",), keep).items():
        name, labels = parse_key(key)
        out[(name, frozenset(labels.items()))] = v
    return out


def value(snapshot, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in snapshot.items() if n == name and want <= ls)


def ours(name: str) -> str:
    return f"ray_{PREFIX}{name}"


def wait_for(url, check, timeout_s: float = 45.0):
    """Scrape until ``check(snapshot)`` holds (Ray exports what was recorded every 2 s in the tests)."""
    deadline = time.time() + timeout_s
    while True:
        snapshot = scrape(url)
        if check(snapshot) or time.time() > deadline:
            return snapshot
        time.sleep(1)


def settled(url: str, timeout_s: float = 30.0) -> dict[tuple[str, frozenset], float]:
    """A scrape once Ray's exporter has caught up with what earlier tests sent: two scrapes 3 s apart
    (more than the 2 s export interval) that agree on the request and token counters. Without it, a
    request that ended just before (the previous test's) was exported after the first scrape and counted
    as this test's (seen once in a full run)."""
    watched = tuple(ours(n) for n in ("requests_total", "generation_tokens_total", "audio_seconds_total"))

    def counters(snapshot):
        return {k: v for k, v in snapshot.items() if k[0] in watched}
    previous, deadline = scrape(url), time.time() + timeout_s
    while True:
        time.sleep(3)
        current = scrape(url)
        if counters(current) == counters(previous) or time.time() > deadline:
            return current
        previous = current


@pytest.fixture(scope="module")
def traffic(server, client, metrics_url):
    """Real requests between two scrapes: what they were, the scrapes before and after."""
    before = settled(metrics_url)
    streamed = []
    for i in range(3):
        stream = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=6 + i,
            temperature=0, stream=True, stream_options={"include_usage": True})
        streamed.append([c for c in stream][-1].usage)
    plain = [client.completions.create(model="demo-chat", prompt=f"one two {i}", max_tokens=5, temperature=0).usage
             for i in range(2)]
    bad = requests.post(f"{server}/v1/chat/completions", timeout=30,
                        json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": "many"})
    assert bad.status_code == 400
    audio_s = 3.0
    clip = encode_audio(speechlike(audio_s), "wav")
    client.audio.transcriptions.create(model="demo-whisper", file=("clip.wav", clip, "audio/wav"))
    usage = streamed + plain

    def moved(after):
        return (value(after, ours("generation_tokens_total"), model="demo-chat")
                - value(before, ours("generation_tokens_total"), model="demo-chat")
                >= sum(u.completion_tokens for u in usage)
                and value(after, ours("audio_seconds_total"), model="demo-whisper")
                > value(before, ours("audio_seconds_total"), model="demo-whisper")
                and value(after, ours("request_errors_total"), model="demo-chat")
                > value(before, ours("request_errors_total"), model="demo-chat"))
    after = wait_for(metrics_url, moved)
    return {"before": before, "after": after, "streamed": streamed, "plain": plain, "usage": usage,
            "audio_s": audio_s}


def delta(traffic, name: str, **labels: str) -> float:
    return value(traffic["after"], name, **labels) - value(traffic["before"], name, **labels)


def test_ttft_counts_every_streamed_request_and_splits_framework_from_engine(traffic):
    streamed = len(traffic["streamed"])
    chat = {"model": "demo-chat", "endpoint": CHAT}
    assert delta(traffic, ours("time_to_first_token_seconds_count"), **chat) == streamed
    assert delta(traffic, ours("time_to_first_token_seconds_count"), model="demo-chat",
                 endpoint=COMPLETIONS) == len(traffic["plain"])
    assert delta(traffic, ours("framework_time_to_first_token_seconds_count"), **chat) == streamed
    # The engine sees every generation request once (one prompt each), whatever its endpoint.
    generation = len(traffic["usage"])
    for name in ("engine_time_to_first_token_seconds_count", "request_queue_time_seconds_count",
                 "request_prefill_time_seconds_count", "replica_time_to_first_records_seconds_count"):
        assert delta(traffic, ours(name), model="demo-chat") == generation, name
    assert delta(traffic, ours("e2e_request_latency_seconds_count"), **chat) == streamed


def test_token_counters_match_the_usage_the_client_got(traffic):
    usage = traffic["usage"]
    completion = sum(u.completion_tokens for u in usage)
    assert delta(traffic, ours("generation_tokens_total"), model="demo-chat") == completion
    assert delta(traffic, ours("prompt_tokens_total"), model="demo-chat") == sum(u.prompt_tokens for u in usage)
    # One gap per token after each answer's first.
    assert delta(traffic, ours("inter_token_latency_seconds_count"), model="demo-chat") == completion - len(usage)
    assert delta(traffic, ours("request_generation_tokens_count"), model="demo-chat") == len(usage)
    assert delta(traffic, ours("request_prompt_tokens_count"), model="demo-chat") == len(usage)
    finished = delta(traffic, ours("request_success_total"), model="demo-chat", finish_reason="length") + \
        delta(traffic, ours("request_success_total"), model="demo-chat", finish_reason="stop")
    assert finished == len(usage)


def test_outcomes_errors_and_audio(traffic):
    ok = delta(traffic, ours("requests_total"), model="demo-chat", outcome="ok")
    assert ok == len(traffic["usage"])
    assert delta(traffic, ours("requests_total"), model="demo-chat", outcome="error") == 1
    assert delta(traffic, ours("request_errors_total"), model="demo-chat", endpoint=CHAT,
                 code="invalid_request_error") == 1
    assert delta(traffic, ours("audio_seconds_total"), model="demo-whisper") == pytest.approx(traffic["audio_s"])
    assert delta(traffic, ours("requests_total"), model="demo-whisper", outcome="ok") == 1


def test_gauges_and_ray_serve_metrics_are_exported_beside_ours(traffic):
    after = traffic["after"]
    for gauge in ("num_running_rows", "num_waiting_requests", "num_waiting_prefill_tokens"):
        assert any(n == ours(gauge) and ("model", "demo-chat") in ls for n, ls in after), gauge
    assert value(after, ours("max_running_rows"), model="demo-chat") >= 32  # the test app's bound
    # Ray Serve's own metrics come from the same endpoint (the dashboard uses both).
    assert any(n.startswith("ray_serve_num_ongoing_requests") for n, _ in after)
    assert value(after, "ray_serve_deployment_request_counter_total") > 0


def test_every_exported_metric_is_in_the_table(traffic):
    """The scrape holds no metric of ours that app/metrics.py does not list (so the README's table and
    the dashboard's check cover them all)."""
    suffixes = ("_bucket", "_count", "_sum")
    names = {n for n, _ in traffic["after"] if n.startswith("ray_" + PREFIX)}
    bases = {next((n[:-len(s)] for s in suffixes if n.endswith(s)), n) for n in names}
    assert bases <= {ours(m) for m in METRICS}, bases - {ours(m) for m in METRICS}


def test_a_client_that_leaves_a_stream_is_counted_as_a_cancellation(server, metrics_url):
    labels = {"model": "demo-chat", "endpoint": CHAT}
    before = settled(metrics_url)
    with requests.post(f"{server}{CHAT}", stream=True, timeout=30,
                       json={"model": "demo-chat", "messages": [{"role": "user", "content": "go on"}],
                             "max_tokens": 500, "ignore_eos": True, "stream": True}) as gone:
        next(gone.iter_lines())  # the first event, then the connection closes

    def cancelled(snapshot):
        return (value(snapshot, ours("request_cancellations_total"), **labels)
                - value(before, ours("request_cancellations_total"), **labels))
    after = wait_for(metrics_url, lambda s: cancelled(s) >= 1)
    assert cancelled(after) == 1
    assert (value(after, ours("requests_total"), outcome="cancelled", **labels)
            - value(before, ours("requests_total"), outcome="cancelled", **labels)) == 1
    assert value(after, ours("time_to_first_token_seconds_count"), **labels) > value(
        before, ours("time_to_first_token_seconds_count"), **labels)  # it had its first token


def test_the_dashboard_queries_only_metrics_this_server_exports(traffic, metrics_url):
    """Every metric cluster/grafana-dashboard.json queries is in the real scrape (ours after traffic, Ray
    Serve's own), except those that appear with their first event: the on-demand pool's (scraped in
    test_on_demand.py) and overload rejections (test_flood.py)."""
    from cluster.grafana import dashboard_metrics

    suffixes = ("_bucket", "_count", "_sum")
    scraped = {n for n, _ in [*traffic["after"], *scrape(metrics_url)]}  # after the tests above
    scraped |= {n[:-len(s)] + s2 for n in scraped for s in suffixes if n.endswith(s) for s2 in suffixes}
    later = {ours(m) for m, spec in METRICS.items() if spec.where == "pool"} | {ours("overload_rejections_total")}
    missing = {m for m in dashboard_metrics() if m not in scraped and m.removesuffix("_bucket") not in later}
    assert not missing, (missing, sorted(n for n in scraped if n.startswith("ray_serve_")))
