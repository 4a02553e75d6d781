"""Issue "Reliability under abuse": requests cheap to send and costly to refuse. Every hostile shape of
``tests/structural_shapes.py`` (bodies under the 32 MiB limit whose structure, not their text, would make
the server work: 900,000 empty messages, many parts, deep content, many or long stop strings, a huge
``logit_bias``, many tools, many completions prompts, long token-id prompts...) is answered, a 400 naming
the parameter or a normal answer, in bounded time; small requests sent meanwhile keep their latency; the
chat replica keeps its process and its memory."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import requests
from ray import serve

from tests.openapi_schema import assert_valid
from tests.structural_shapes import MODEL, SHAPES

REPEATED = ("900k-empty-messages", "empty-messages-beyond-the-context", "token-ids-beyond-the-context-small-body",
            "tool-description-beyond-the-context-small-body")
ANSWER_WITHIN_S = 15  # per hostile request, 2 shared CPUs; before the bounds, 900,000 messages took 68 s


def small_latency(session: requests.Session, url: str) -> float:
    started = time.perf_counter()
    resp = session.post(url, timeout=120, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return time.perf_counter() - started


def rss_mb(pid: int | None) -> float | None:
    """The process's private resident memory (RssAnon: not the object store's shared pages it maps)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return None
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("RssAnon"))


def ingress_pid() -> int | None:
    """This cluster's ingress replica's process (asked through Ray), or None where Ray does not say."""
    import os

    import ray

    try:
        found = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "OpenAIIngress" in a["name"])
        actor = ray.get_actor(found["name"], namespace=found["namespace"])
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    except Exception:
        return None


def replica_pid() -> int:
    return serve.get_deployment_handle(MODEL, app_name="openai").stats.remote().result()["pid"]


def test_hostile_shapes_are_answered_in_bounded_time_and_small_requests_keep_their_latency(server):
    session, small = requests.Session(), f"{server}/v1/chat/completions"
    for _ in range(3):
        small_latency(session, small)  # warm up every hop
    baseline = statistics.median(small_latency(session, small) for _ in range(9))
    pid, ingress = replica_pid(), ingress_pid()
    memory_before = rss_mb(pid), rss_mb(ingress)

    during: list[float] = []
    report: list[tuple[str, int, float, float]] = []
    for shape in SHAPES:
        raw = json.dumps(shape.body(), separators=(",", ":")).encode()
        answer: dict[str, object] = {}

        def send() -> None:
            started = time.perf_counter()
            answer["resp"] = requests.post(f"{server}{shape.route}", data=raw, timeout=120,
                                           headers={"content-type": "application/json"})
            answer["took"] = time.perf_counter() - started

        sender = threading.Thread(target=send)
        sender.start()
        samples = [small_latency(session, small)]  # one sent with it, then more while it is in flight
        while sender.is_alive():
            samples.append(small_latency(session, small))
        sender.join()
        during += samples
        resp, took = answer["resp"], answer["took"]
        report.append((shape.name, resp.status_code, round(took, 2), round(max(samples), 2)))
        assert took < ANSWER_WITHIN_S, (shape.name, took)
        if shape.param is None and shape.code is None:
            assert resp.status_code == 200, (shape.name, resp.text[:300])
            continue
        assert resp.status_code == 400, (shape.name, resp.status_code, resp.text[:300])
        assert_valid(resp.json(), "ErrorResponse")
        error = resp.json()["error"]
        assert error["param"] == shape.param, (shape.name, error)
        assert shape.code is None or error["code"] == shape.code, (shape.name, error)

    print("\nshape, status, seconds, slowest small request meanwhile:", *report, sep="\n  ")
    print(f"small requests: idle median {baseline:.3f} s; during: median {statistics.median(during):.3f} s, "
          f"max {max(during):.3f} s over {len(during)}")
    # Medians, plus 0.1 s for two shared cores also busy moving the bodies through the proxy and parsing
    # them (the JSON decoder holds the GIL: README, Structural bounds).
    assert statistics.median(during) <= 2 * baseline + 0.1, (baseline, sorted(during))
    assert replica_pid() == pid  # the same replica: not killed by a failed health check
    memory_after = rss_mb(pid), rss_mb(ingress)
    print(f"private MB (replica, ingress): before {memory_before}, after {memory_after}")
    # Before the bounds the replica grew from 468 MB to 2.8 GB and stayed there: now no hostile structure
    # reaches it, and what reaches it (25 MB strings) costs it little.
    assert memory_after[0] - memory_before[0] < 300, (memory_before, memory_after)
    # Sending the heaviest shapes again leaves the replica where it was. The ingress, which parses every
    # body, is only printed: glibc keeps part of what its parsing threads freed (README, Structural bounds).
    again = [shape for shape in SHAPES if shape.name in REPEATED]
    for shape in again * 2:
        resp = requests.post(f"{server}{shape.route}", data=json.dumps(shape.body(), separators=(",", ":")),
                             timeout=120, headers={"content-type": "application/json"})
        assert resp.status_code == (400 if shape.param else 200), (shape.name, resp.text[:300])
    memory_again = rss_mb(pid), rss_mb(ingress)
    print(f"private MB (replica, ingress) after sending {len(again) * 2} of them again: {memory_again}")
    assert memory_again[0] - memory_after[0] < 50, (memory_after, memory_again)
