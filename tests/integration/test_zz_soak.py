"""A 3-minute soak of the session server with one fault: bench/soak.py's harness at CI scale.

Six closed-loop clients send the soak's mix (chat streamed and not on the real chat model, embeddings, a
WAV transcription, fill-mask, demo-chat, the on-demand demo-chat-s1, demo-vlm with a data-URL image) for
165 s; at 60 s a replica of the real chat model is ray.kill-ed. Asserted as the full soak does: no request
hangs, is cut (a stream without [DONE]) or ends in anything but a clean OpenAI error; the RSS of every
process of the server (ingress, replicas, HAProxy, controller, raylet, GCS...) does not grow after warm-up
(its level at the end at most 20 % above its baseline, no peak over 40 %; the full soak: 10 % and 20 %);
p99 latency is back to its pre-fault baseline (≤ 1.5x) within RECOVERY_S of the kill (the full soak's 30 s
is out of reach here: see the assertion).

Runs last (file name): it kills a replica of the shared server, and waits until the model answers again.
"""

import os
import time

import pytest
import requests

from bench.soak import kill_replica, machine, prime, soak
from bench.soak_report import analyse, markdown, write
from bench.soak_traffic import default_mix

pytestmark = pytest.mark.integration

CHAT = "SmolLM2-135M-Instruct"
RECOVERY_S = 90
# tests/conftest.py's models: demo-chat and demo-vlm are pinned there, demo-chat-s1 is on demand.
MIX = default_mix(chat=CHAT, others=(("demo-chat", "demo-chat", "stream"), ("demo-chat-s1", "on-demand", "json"),
                                     ("demo-vlm", "demo-vlm", "image")), max_tokens=16)


def test_a_short_soak_with_a_replica_kill_keeps_every_request_clean_memory_flat_and_recovers(server, tmp_path):
    load = os.getloadavg()[0]
    prime(server, MIX, timeout_s=120, burst=6)
    run = soak(server, MIX, duration_s=165, warmup_s=30, faults=[(60, "kill replica", CHAT)],
               inject=lambda action, target: kill_replica(target), roots=[os.getpid()], clients=6,
               timeout_s=60, sample_every_s=5)
    run.meta.update(mode="CI", command="pytest tests/integration/test_zz_soak.py", machine=machine(load),
                    server="tests/conftest.py's app on the session's local Ray instance")
    # Growth at most 20 % here (the full soak: 10 %): 2 minutes after warm-up some replicas' allocators
    # are still taking their working set (demo-whisper's grew 9.7 % in one CI-sized run, then held). A fall
    # or a transient peak is no leak (bench/soak_report.py says why the verdict changed).
    report = analyse(run, settle_s=60, rss_tolerance=0.20)
    print(markdown(run, report), "\nreport, figures and plot:", write(run, report, tmp_path / "soak"))

    counts = report["counts"]["all"]
    assert not report["failures"] and not run.stuck_clients, (report["failures"][:3], counts)
    assert counts.get("ok", 0) >= 100, counts
    assert all(label == "ok" or label.split()[0] in ("http", "stream_error", "refused") for label in counts), counts
    [fault] = report["faults"]
    assert not fault["error"] and fault["victim"].startswith("SERVE_REPLICA::"), fault
    # The full soak's limit is 30 s; here 90 s, as test_zz_replica_failure.py allows. The replacement replica
    # of the real chat model starts in 25-60 s on a busy 2-CPU machine (its imports of torch, transformers
    # and torchao alone took 33 s in one run) and no chat request can succeed before: the bound here is the
    # replica's start, which the full soak reports against 30 s.
    assert fault["recovered_s"] is not None and fault["recovered_s"] <= RECOVERY_S, fault
    judged = [m for m in report["memory"] if m["flat"] is not None]
    assert len(judged) >= 8, report["memory"]  # ingress, replicas, HAProxy, controller, raylet, GCS...
    assert all(m["flat"] for m in judged), [m for m in judged if not m["flat"]]

    # Leave the shared server as it was: the replacement replica answers.
    deadline = time.time() + 120
    while time.time() < deadline:
        r = requests.post(f"{server}/v1/chat/completions", timeout=60,
                          json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
