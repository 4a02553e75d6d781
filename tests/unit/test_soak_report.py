"""bench/soak_report.py's verdicts on synthetic runs, and bench/soak_traffic.py's outcome rules against a
fake server (httpx.MockTransport): no Ray, no model."""

import json

import httpx
import pytest

from bench.soak import plan
from bench.soak_report import Fault, Run, analyse, label, markdown
from bench.soak_traffic import Kind, Result, send, wav_bytes

T0 = 1_000_000.0


def steady(t_from: float, t_to: float, latency: float = 0.5, deployment: str = "chat", step: float = 0.5,
           outcome: str = "ok", detail: str = "") -> list[Result]:
    out, t = [], t_from
    while t < t_to:
        out.append(Result("chat", deployment, T0 + t, T0 + t + latency, outcome, detail))
        t += step
    return out


def samples(rss_of, t_to: float = 300, step: float = 10):
    return [(T0 + t, {pid: (name, fn(t)) for pid, (name, fn) in rss_of.items()})
            for t in range(0, int(t_to), int(step))]


def run(results, faults=(), rss=None, t_to=300.0) -> Run:
    rss = rss or {1: ("raylet", lambda t: 100 << 20)}
    return Run(T0, T0 + t_to, T0 + 60, results, list(faults), samples(rss, t_to))


def test_a_clean_run_passes_and_a_recovery_is_timed_from_the_fault():
    results = steady(0, 150) + steady(150, 165, outcome="http", detail="503 model_unavailable") + steady(165, 300)
    r = run(results, [Fault(T0 + 150, "kill replica", "chat", "SERVE_REPLICA::openai#chat#x")])
    a = analyse(r)
    assert a["passed"], a["checks"]
    [f] = a["faults"]
    assert f["baseline_p99"] == pytest.approx(0.5) and f["recovered_s"] == pytest.approx(15, abs=1)
    assert f["errors_after"] == 30 and f["errors_by_outcome"] == {"http 503 model_unavailable": 30}
    assert a["counts"]["all"] == {"ok": 570, "http 503 model_unavailable": 30}
    assert "PASS" in markdown(r, a) and "FAIL" not in markdown(r, a)


def test_slow_requests_after_a_fault_delay_the_recovery_beyond_the_limit():
    results = steady(0, 150) + steady(150, 200, latency=2.0) + steady(200, 300)
    a = analyse(run(results, [Fault(T0 + 150, "kill replica", "chat")]))
    assert a["faults"][0]["recovered_s"] == pytest.approx(50, abs=2) and not a["passed"]


def test_recovery_needs_a_request_of_the_faulted_deployment():
    results = steady(0, 300, deployment="embed") + steady(0, 150) + steady(200, 300)
    a = analyse(run(results, [Fault(T0 + 150, "kill replica", "chat")]))
    assert a["faults"][0]["recovered_s"] == pytest.approx(50, abs=1)


def test_hangs_and_cut_streams_fail_the_run():
    results = steady(0, 300) + [Result("chat", "chat", T0 + 10, T0 + 70, "timeout"),
                                Result("chat", "chat", T0 + 20, T0 + 21, "cut", "stream ended without [DONE]")]
    a = analyse(run(results))
    assert not a["passed"] and len(a["failures"]) == 2


def test_cuts_in_flight_at_a_node_loss_are_reported_apart_and_recovery_waits_for_the_lost_deployment():
    loss = Fault(T0 + 150, "lose node", "chat", "worker1")
    in_flight = [Result("chat", "chat", T0 + 140, T0 + 151, "cut", "RemoteProtocolError"),
                 Result("embeddings", "embed", T0 + 149, T0 + 152, "cut", "ReadError")]
    later_cut = Result("chat", "chat", T0 + 160, T0 + 161, "cut", "RemoteProtocolError")
    results = steady(0, 300, deployment="embed") + steady(0, 150) + steady(170, 300) + in_flight
    a = analyse(run(results, [loss]))
    assert a["cut_at_node_loss"] == 2 and not a["failures"]
    assert a["faults"][0]["recovered_s"] == pytest.approx(20, abs=1) and a["passed"]
    assert "2 request(s) in flight at a node loss" in markdown(run(results, [loss]), a)
    assert analyse(run(results + [later_cut], [loss]))["failures"][0]["start"] == T0 + 160


def test_memory_growth_beyond_the_tolerance_fails_after_warm_up_only():
    rss = {1: ("replica chat", lambda t: (100 + (50 if t < 60 else 0) + (t > 200) * 15) << 20),
           2: ("haproxy", lambda t: int((10 + t / 1000) * 2**20)),  # +3 % over the run: flat
           3: ("IDLE", lambda t: (50 + t) << 20)}           # Ray's worker pool: not judged
    a = analyse(run(steady(0, 300), rss=rss))
    verdicts = {m["process"]: m["flat"] for m in a["memory"]}
    assert verdicts == {"replica chat": False, "haproxy": True, "IDLE": None}
    assert a["memory"][-1]["growth"] == pytest.approx(0.15, abs=0.01) and not a["passed"]


def test_memory_that_falls_or_peaks_and_gives_back_is_flat_but_a_runaway_peak_is_not():
    # The session server's ingress in CI: 449 -> 290 MB (memory of earlier tests' bodies returned to the
    # OS) in one run, 273 -> 333 -> 280 MB in another. Neither is a leak.
    rss = {1: ("replica OpenAIIngress", lambda t: (450 - min(t, 200) * 0.8) * 2**20),
           2: ("replica chat", lambda t: (270 + (60 if 150 < t < 200 else 0)) << 20),
           3: ("haproxy", lambda t: (100 + (50 if 150 < t < 200 else 0)) << 20)}
    a = analyse(run(steady(0, 300), rss=rss), rss_tolerance=0.20)  # as tests/integration/test_zz_soak.py
    verdicts = {m["process"]: m["flat"] for m in a["memory"]}
    assert verdicts == {"replica OpenAIIngress": True, "replica chat": True, "haproxy": False}
    ingress, chat, haproxy = (next(m for m in a["memory"] if m["process"] == p)
                              for p in ("replica OpenAIIngress", "replica chat", "haproxy"))
    assert ingress["growth"] < -0.2 and round(chat["peak"], 2) == 0.22 and haproxy["peak"] == 0.5
    assert "| +22.2% | yes |" in markdown(run(steady(0, 300), rss=rss), a)


def test_a_process_that_appears_late_is_judged_after_it_settles():
    rss = {1: ("raylet", lambda t: 100 << 20), 7: ("replica new", lambda t: (300 if t > 150 else 0) << 20)}
    samples_ = [(t, {pid: v for pid, v in procs.items() if pid == 1 or t - T0 >= 150})
                for t, procs in samples(rss)]
    r = Run(T0, T0 + 300, T0 + 60, steady(0, 300), [], samples_)
    new = next(m for m in analyse(r, settle_s=60)["memory"] if m["pid"] == 7)
    assert new["first_s"] == 150 and new["flat"] and new["baseline_mb"] == 300


def test_labels_and_fault_plan():
    assert label(["ray::ServeReplica:openai:SmolLM2-135M-Instruct"]) == "replica SmolLM2-135M-Instruct"
    assert label(["ray::ServeReplica:openai:Qwen2.5-0.5B.initialize_and_get_metadata"]) == "replica Qwen2.5-0.5B"
    assert label(["ray::ServeController.listen_for_change"]) == "ServeController"
    assert label(["/x/ray/core/src/ray/raylet/raylet", "--a"]) == "raylet"
    assert label(["/v/bin/python3", "-u", "/x/log_monitor.py"]) == "log_monitor.py"
    assert [t for t, _, _ in plan(1800, 300, ["a", "b"])] == [300, 600, 900, 1200, 1500]
    assert [x for _, _, x in plan(180, 90, ["a", "b"])] == ["a"]
    assert plan(1800, 300, ["a"], 1050)[3] == (1050, "lose node", "SmolLM2-135M-Instruct")


def _kind(stream: bool) -> Kind:
    return Kind("k", "d", 1, "/v1/x", stream, lambda i: {"json": {}}, lambda body: "choices" in body)


def _send(handler, stream: bool = True):
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        return send(client, "http://test", _kind(stream), 0)


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


ERROR = json.dumps({"error": {"message": "gone", "type": "server_error", "code": "replica_unavailable"}})


@pytest.mark.parametrize("body, expected", [
    (sse('{"choices": []}', "[DONE]"), ("ok", "")),
    (sse('{"choices": []}', ERROR, "[DONE]"), ("stream_error", "replica_unavailable")),
    (sse('{"choices": []}', ERROR), ("cut", "stream ended without [DONE] after error replica_unavailable")),
    (sse('{"choices": []}'), ("cut", "stream ended without [DONE]")),
    (sse('{"error": "boom"}', "[DONE]"), ("unclean", None)),
])
def test_stream_outcomes(body, expected):
    outcome = _send(lambda request: httpx.Response(200, content=body))
    assert outcome[0] == expected[0] and (expected[1] is None or outcome[1] == expected[1])


def test_error_statuses_and_bodies():
    assert _send(lambda r: httpx.Response(503, content=ERROR)) == ("http", "503 replica_unavailable")
    assert _send(lambda r: httpx.Response(502, text="<html>bad gateway</html>"))[0] == "unclean"
    assert _send(lambda r: httpx.Response(200, json={"choices": [1]}), stream=False) == ("ok", "")
    assert _send(lambda r: httpx.Response(200, json={"nope": 1}), stream=False)[0] == "unclean"

    def refuse(request):
        raise httpx.ConnectError("refused")

    def hang(request):
        raise httpx.ReadTimeout("no answer")

    def reset(request):
        raise httpx.RemoteProtocolError("peer closed")

    assert _send(refuse)[0] == "refused" and _send(hang)[0] == "timeout" and _send(reset)[0] == "cut"


def test_wav_is_a_one_second_16k_mono_clip():
    import io
    import wave

    with wave.open(io.BytesIO(wav_bytes())) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (1, 16000, 16000)
