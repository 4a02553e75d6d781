"""`serve deploy` onto a local 3-node Ray cluster: placement, redeploy, autoscaling, node loss.

The tests run in file order on one cluster (tests/cluster/conftest.py): deploy, then a live user_config
change, then autoscaling 1 -> 2 -> 1, then the loss of a worker node (last: it changes the cluster).
Everything is observed from outside, as an operator would: the `serve` CLI, Serve's REST API (replicas
and their nodes), and HTTP through the Serve proxies with the OpenAI SDK or a closed-loop client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from openai import OpenAI

from bench.autoscale_load import CLEAN_ERRORS, ClosedLoop, longest_gap, outcomes
from cluster.local_cluster import CHAT
from tests.cluster.conftest import wait_running, write_config

pytestmark = pytest.mark.cluster


def wait_for(predicate, timeout_s: float, what: str, period_s: float = 1.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # the API can be briefly unreachable while nodes come and go
            pass
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def replica_stats(cluster, calls: int = 4) -> list[dict]:
    """BatchedDeployment.stats() of the chat model's replicas, from a driver attached to the cluster (a
    subprocess: this test process may host another Ray instance)."""
    code = ("import json, ray; from ray import serve; ray.init(log_to_driver=False); "
            "h = serve.get_deployment_handle('" + CHAT + "', 'openai'); "
            f"print(json.dumps([h.stats.remote().result() for _ in range({calls})]))")
    env = cluster.env()
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_serve_deploy_brings_the_app_up_spread_over_the_nodes(local_cluster):
    cluster, base, _ = local_cluster
    status = cluster.cli("serve", "status")
    assert status.returncode == 0, status.stderr
    parsed = yaml.safe_load(status.stdout)
    assert parsed["applications"]["openai"]["status"] == "RUNNING"
    assert {d["status"] for d in parsed["applications"]["openai"]["deployments"].values()} == {"HEALTHY"}

    names = cluster.node_names()
    assert sorted(names.values()) == ["head", "worker1", "worker2"]
    details = cluster.serve_details()
    # A proxy on every node (proxy_location: EveryNode), all healthy.
    assert {p["node_id"] for p in details["proxies"].values() if p["status"] == "HEALTHY"} == set(names)
    deployments = details["applications"]["openai"]["deployments"]
    placed = {name: [names[r["node_id"]] for r in d["replicas"] if r["state"] == "RUNNING"]
              for name, d in deployments.items()}
    assert all(len(nodes) >= 1 for nodes in placed.values()), placed
    assert len({n for nodes in placed.values() for n in nodes}) >= 2, f"replicas not spread: {placed}"
    assert placed[CHAT][0].startswith("worker"), placed  # it needs a (fake) GPU node

    client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
    assert {CHAT, "demo-whisper"} <= {m.id for m in client.models.list().data}
    out = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1


def test_a_redeploy_with_a_new_user_config_applies_live_without_failing_a_request(local_cluster):
    cluster, base, path = local_cluster
    before = {r["replica_id"] for r in cluster.replicas(CHAT)}
    assert {s["batching"]["max_batch_size"] for s in replica_stats(cluster)} == {8}
    config = yaml.safe_load(path.read_text())
    chat = next(d for d in config["applications"][0]["deployments"] if d["name"] == CHAT)
    chat["user_config"]["max_batch_size"] = 4
    # Keep this test about the redeploy: few clients, so the autoscaler has no reason to act.
    load = ClosedLoop(base, CHAT, clients=3, max_tokens=16).start()
    try:
        time.sleep(4)
        run = cluster.cli("serve", "deploy", str(write_config(config, path)))
        assert run.returncode == 0, run.stderr
        wait_for(lambda: {s["batching"]["max_batch_size"] for s in replica_stats(cluster, 2)} == {4},
                 120, "the replicas to apply max_batch_size 4")
        wait_running(cluster)
        time.sleep(3)
    finally:
        calls = load.stop()
    counts = outcomes(calls)
    print(f"redeploy under load: {counts}")
    assert counts.get("ok", 0) >= 10 and set(counts) == {"ok"}, counts
    # Applied in place by reconfigure: the same replicas, no restart.
    assert {r["replica_id"] for r in cluster.replicas(CHAT)} == before


def test_load_scales_the_chat_model_out_to_two_nodes_and_back_to_one(local_cluster):
    cluster, base, _ = local_cluster
    assert len(cluster.replicas(CHAT)) == 1
    names = cluster.node_names()
    load = ClosedLoop(base, CHAT, clients=24, max_tokens=64).start()
    t0 = time.time()
    try:
        two = wait_for(lambda: [r for r in [cluster.replicas(CHAT)] if len(r) == 2] and
                       cluster.replicas(CHAT), 180, "a second chat replica")
        t_up = time.time() - t0
    finally:
        calls = load.stop()
    assert {names[r["node_id"]] for r in two} == {"worker1", "worker2"}  # one per (fake) GPU node
    t_stop = time.time()
    wait_for(lambda: len(cluster.replicas(CHAT)) == 1, 180, "scale-down to one replica")
    t_down = time.time() - t_stop
    counts = outcomes(calls)
    print(f"autoscale: 1->2 replicas {t_up:.0f} s after the load began, 2->1 {t_down:.0f} s after it "
          f"stopped; requests {counts}")
    assert set(counts) == {"ok"}, counts


def test_losing_a_worker_node_is_survived_with_clean_errors_and_a_bounded_gap(local_cluster):
    cluster, base, _ = local_cluster
    names = cluster.node_names()
    chat_node = names[cluster.replicas(CHAT)[0]["node_id"]]
    assert chat_node.startswith("worker")
    load = ClosedLoop(base, CHAT, clients=4, max_tokens=16, timeout_s=60).start()
    try:
        time.sleep(5)
        t_kill = time.time()
        cluster.kill_node(chat_node)
        wait_for(lambda: len(cluster.alive_nodes()) == 2, 120, "the node to be declared dead")
        survivors = set(cluster.node_names())
        wait_for(lambda: [r for r in cluster.replicas(CHAT) if r["node_id"] in survivors], 180,
                 "a chat replica on a surviving node")
        wait_running(cluster, timeout_s=180)
        t_recovered = time.time()
        time.sleep(8)
    finally:
        calls = load.stop()
    counts = outcomes(calls)
    failed = [c for c in calls if c.outcome != "ok"]
    gap = longest_gap(calls, t_kill)
    print(f"node loss ({chat_node}): outage {gap:.1f} s (no successful completion), recovered "
          f"{t_recovered - t_kill:.0f} s after the kill; requests {counts}; "
          f"errors {sorted({c.detail for c in failed})}")
    assert "hang" not in counts, counts
    assert all(c.outcome in CLEAN_ERRORS for c in failed), counts
    after = [c for c in calls if c.start >= t_recovered]
    assert after and all(c.outcome == "ok" for c in after), outcomes(after)
    assert gap < 120, gap
