"""Autoscaling bench: a bursty load on the local 3-node cluster, Ray's default policy vs the engine-load
policy (deployments/autoscaling.py), replica count / request rate / p50 latency over time.

    python -m bench.autoscale --out bench/results/autoscale      # ~10 min on a 2-core machine

Starts cluster/local_cluster.py (head + 2 workers with one ``fake_gpu`` each), deploys serve_config.yaml
as the cluster tests do (demo-chat on ``fake_gpu`` replicas, min 1 / max 2), and for each policy runs
the same profile: ``--base-clients`` closed-loop streaming clients throughout, ``--burst-clients`` more
from ``--quiet-s`` for ``--burst-s`` seconds, then the base load until the deployment is back to one
replica. ``--n`` makes every burst request ask for ``n`` choices (n decoding rows per request). Reports, per policy: seconds from the burst's start until the second replica runs, p50/p99
latency of requests sent during the burst, failed requests; writes ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from app.local import free_port
from bench.autoscale_load import ClosedLoop, Sampler, outcomes, windows
from cluster.local_cluster import LocalCluster, local_serve_config
from deployments.autoscaling import POLICY_PATH

POLICIES = {
    "default": None,  # Ray's: ongoing requests averaged over look_back_period_s vs target_ongoing_requests
    "engine": {"policy_function": POLICY_PATH,
               "policy_kwargs": {"target_rows": 8, "max_waiting_prefill_tokens": 256}},
}


def run_policy(cluster: LocalCluster, name: str, port: int, args: argparse.Namespace, state: Path) -> dict:
    config = local_serve_config(port, POLICIES[name])
    path = state / f"serve_config.{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run = cluster.cli("serve", "deploy", str(path))
    assert run.returncode == 0, run.stderr
    # A new policy restarts the replicas (Serve rebuilds the app): wait until the old ones are gone.
    _wait(lambda: _healthy(cluster) and _replica_counts(cluster) == (1, 1)
          and len(cluster.replicas("demo-chat", state=None)) == 1, 300, "one healthy replica")
    time.sleep(10)
    base = f"http://127.0.0.1:{port}"
    sampler = Sampler(lambda: _replica_counts(cluster)).start()
    t0 = time.time()
    low = ClosedLoop(base, "demo-chat", args.base_clients, max_tokens=args.max_tokens).start()
    time.sleep(args.quiet_s)
    t_burst = time.time()
    burst = ClosedLoop(base, "demo-chat", args.burst_clients, max_tokens=args.max_tokens, n=args.n).start()
    time.sleep(args.burst_s)
    burst_calls = burst.stop()
    t_burst_end = time.time()
    _wait(lambda: len(cluster.replicas("demo-chat")) == 1, args.settle_s, "scale-down", fail=False)
    time.sleep(5)
    calls = low.stop() + burst_calls
    counts = sampler.stop()
    t_end = time.time()
    samples = [(t, running) for t, (running, _) in counts]
    up, down = scale_times(samples, t_burst, t_burst_end)
    decided = next((t for t, (_, target) in counts if t >= t_burst and target >= 2), None)
    in_burst = [c.end - c.start for c in calls if t_burst <= c.start < t_burst_end and c.outcome == "ok"]
    return {
        "policy": name, "autoscaling_config": next(d for d in config["applications"][0]["deployments"]
                                                   if d["name"] == "demo-chat")["autoscaling_config"],
        "time_to_decide_s": None if decided is None else decided - t_burst,
        "time_to_scale_up_s": None if up is None else up - t_burst,
        "time_to_scale_down_s": None if down is None else down - t_burst_end,
        "burst_ok_per_s": sum(t_burst <= c.end < t_burst_end and c.outcome == "ok" for c in calls)
        / (t_burst_end - t_burst),
        "burst_latency_p50_s": float(np.percentile(in_burst, 50)) if in_burst else None,
        "burst_latency_p99_s": float(np.percentile(in_burst, 99)) if in_burst else None,
        "requests": outcomes(calls),
        "phases": {"burst_start": t_burst - t0, "burst_end": t_burst_end - t0},
        "replicas": [(t - t0, n) for t, n in samples],
        "target_replicas": [(t - t0, target) for t, (_, target) in counts],
        "windows": windows(calls, t0, t_end, args.window_s),
    }


def scale_times(samples: list[tuple[float, int]], t_burst: float, t_burst_end: float) -> tuple[float | None, float | None]:
    """(first time >= 2 replicas ran after the burst began, first time after both the burst's end and
    that scale-up when one replica was left); None when it did not happen."""
    up = next((t for t, n in samples if t >= t_burst and n >= 2), None)
    if up is None:
        return None, None
    return up, next((t for t, n in samples if t >= max(t_burst_end, up) and n == 1), None)


def _replica_counts(cluster: LocalCluster) -> tuple[int, int]:
    """(RUNNING demo-chat replicas, the autoscaler's target) from the Serve API."""
    dep = cluster.serve_details()["applications"]["openai"]["deployments"]["demo-chat"]
    return sum(r["state"] == "RUNNING" for r in dep["replicas"]), int(dep.get("target_num_replicas") or 0)


def _healthy(cluster: LocalCluster) -> bool:
    app = (cluster.serve_details().get("applications") or {}).get("openai") or {}
    return app.get("status") == "RUNNING" and all(d["status"] == "HEALTHY" for d in app["deployments"].values())


def _wait(predicate, timeout_s: float, what: str, fail: bool = True) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if predicate():
                return True
        except Exception:
            pass
        time.sleep(1)
    if fail:
        raise RuntimeError(f"timed out waiting for {what}")
    return False


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for r in results:
        t, n = zip(*r["replicas"]) if r["replicas"] else ([], [])
        line = axes[0].step(t, n, where="post", label=f"{r['policy']} policy: running")[0]
        if r.get("target_replicas"):
            tt, nn = zip(*r["target_replicas"])
            axes[0].step(tt, nn, where="post", linestyle=":", color=line.get_color(),
                         label=f"{r['policy']} policy: target")
        w = r["windows"]
        axes[1].plot([x["t"] for x in w], [x["rate"] for x in w], marker=".", label=r["policy"])
        axes[2].plot([x["t"] for x in w if x["p50"] is not None], [x["p50"] for x in w if x["p50"] is not None],
                     marker=".", label=r["policy"])
    for ax in axes:
        b = results[0]["phases"]
        ax.axvspan(b["burst_start"], b["burst_end"], color="orange", alpha=0.12)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("demo-chat replicas")
    axes[0].set_yticks([0, 1, 2])
    axes[0].legend(loc="upper right")
    axes[1].set_ylabel("completed req/s")
    axes[2].set_ylabel("p50 latency (s)")
    axes[2].set_xlabel("seconds (shaded: burst)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="default,engine")
    parser.add_argument("--base-clients", type=int, default=2)
    parser.add_argument("--burst-clients", type=int, default=22)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n", type=int, default=1, help="choices per burst request (n rows each)")
    parser.add_argument("--quiet-s", type=float, default=15)
    parser.add_argument("--burst-s", type=float, default=90)
    parser.add_argument("--settle-s", type=float, default=90, help="most seconds to wait for scale-down")
    parser.add_argument("--window-s", type=float, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/autoscale"))
    args = parser.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="stb-", dir="/tmp"))
    cluster = LocalCluster(state)
    results = []
    try:
        cluster.start(workers=2, head_cpus=1, worker_cpus=2)
        port = free_port()
        for name in args.policies.split(","):
            result = run_policy(cluster, name, port, args, state)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("replicas", "target_replicas", "windows")}), flush=True)
    except BaseException:
        cluster.stop()
        print(f"failed; logs kept in {state / 'logs'}")
        raise
    cluster.stop()
    shutil.rmtree(state, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=1))
    plot(results, args.out.with_suffix(".png"),
         f"demo-chat on a local 3-node Ray cluster: {args.base_clients} clients, burst of {args.burst_clients} "
         f"more (n={args.n}) (2-core shared machine)")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
