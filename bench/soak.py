"""Soak with faults: the shipped config under mixed traffic for a long time, a replica killed every few
minutes (and, on the local cluster, a worker node lost once); asserts that nothing hangs or is cut, that
memory stays flat and that latency recovers. Not part of CI (tests/integration/test_zz_soak.py is the
3-minute version against the test server).

    python -m bench.soak                                   # 30 min, local; bench/results/soak.{md,json,png}
    python -m bench.soak --minutes 3 --fault-every 90 --warmup 45 --out /tmp/soak    # a smoke run
    python -m bench.soak --cluster                         # on cluster/local_cluster.py's 3 nodes, + a node loss

Local mode runs serve_config.yaml as ``serve run`` does (its args, its ``deployments:`` options and its
app env, throughput-optimized path with HAProxy) on a private Ray instance in this process
(``app.local.serve_locally``: never another Ray on the machine), declaring ``--num-cpus`` (default: the
machine's, as ``serve run`` would). Cluster mode starts head + 2 workers and ``serve deploy`` s
``cluster.local_cluster.local_serve_config`` (serve_config.yaml, the chat model on the fake-GPU workers).

The run: one request of each kind (loads every model) and a burst of ``--clients`` concurrent ones of each
kind (see :func:`prime`), then ``--clients`` closed-loop clients over the
mix of bench/soak_traffic.py for ``--minutes``; the first ``--warmup`` seconds are warm-up. Every
``--fault-every`` seconds a replica of the next ``--targets`` deployment is ``ray.kill`` ed (as
tests/integration/test_zz_replica_failure.py does); in cluster mode the worker node that runs the chat
model is SIGKILLed once, at ``--node-loss-at``. The RSS of every server process is sampled every
``--sample-every`` seconds. Verdicts and figures: bench/soak_report.py. Exit status 1 if a verdict fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
import yaml

from bench.autoscale_load import Sampler
from bench.soak_report import Fault, Run, analyse, rss_probe, write
from bench.soak_traffic import Kind, MixLoop, default_mix, send

ROOT = Path(__file__).resolve().parents[1]
CHAT = "SmolLM2-135M-Instruct"
# The chat model every other fault, the other deployments in turn between.
TARGETS = [CHAT, "on-demand", CHAT, "demo-whisper", CHAT, "all-MiniLM-L6-v2", CHAT, "demo-fill-mask"]


def replica_actor_names(deployment: str) -> list[str]:
    """Named replica actors of ``deployment`` (``SERVE_REPLICA::app#deployment#id``) in the connected Ray."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]


def kill_replica(deployment: str) -> str:
    """``ray.kill`` one replica of ``deployment`` (no restart: Serve replaces it); returns its name."""
    import ray

    names = replica_actor_names(deployment)
    if not names:
        raise RuntimeError(f"no replica of {deployment} found")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


class LocalServer:
    """serve_config.yaml on a private Ray instance in this process."""

    mode = "local"

    def __init__(self, config: Path, num_cpus: int) -> None:
        self.config, self.num_cpus = config, num_cpus

    def start(self) -> str:
        from app.local import serve_locally

        app = yaml.safe_load(self.config.read_text())["applications"][0]
        options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
        env = (app.get("runtime_env") or {}).get("env_vars") or {}
        self.base = serve_locally(app["args"], options, num_cpus=self.num_cpus, env=env, timeout_s=900)
        self.describe = f"{self.config.name} on a private local Ray instance ({self.num_cpus} CPUs declared)"
        return self.base

    def roots(self) -> list[int]:
        return [os.getpid()]  # Ray's processes are this driver's descendants (excluded itself)

    kill_replica = staticmethod(kill_replica)

    def lose_node(self, deployment: str) -> str:
        raise RuntimeError("a node loss needs --cluster")

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


class ClusterServer:
    """serve_config.yaml deployed with ``serve deploy`` on cluster/local_cluster.py's head + 2 workers."""

    mode = "cluster"
    KILL = ("import sys, ray; ray.init(log_to_driver=False); from bench.soak import kill_replica; "
            "print(kill_replica(sys.argv[1]))")

    def start(self) -> str:
        from app.local import free_port
        from cluster.local_cluster import LocalCluster, local_serve_config

        self.state = Path(tempfile.mkdtemp(prefix="sts-", dir="/tmp"))  # short: Ray's socket paths
        self.cluster = LocalCluster(self.state)
        self.cluster.start(workers=2, head_cpus=1, worker_cpus=2)
        port = free_port()
        path = self.state / "serve_config.yaml"
        path.write_text(yaml.safe_dump(local_serve_config(port), sort_keys=False))
        run = self.cluster.cli("serve", "deploy", str(path))
        if run.returncode:
            raise RuntimeError(run.stdout + run.stderr)
        _wait(self._healthy, 600, "the app RUNNING and every deployment HEALTHY")
        self.describe = "serve_config.yaml (local_serve_config) on a local 3-node cluster (head 1 CPU, 2 workers x 2)"
        self.base = f"http://127.0.0.1:{port}"
        return self.base

    def _healthy(self) -> bool:
        app = (self.cluster.serve_details().get("applications") or {}).get("openai") or {}
        return app.get("status") == "RUNNING" and all(d["status"] == "HEALTHY" for d in app["deployments"].values())

    def roots(self) -> list[int]:
        return [n["pid"] for n in self.cluster.state()["nodes"] if not n.get("killed")]

    def kill_replica(self, deployment: str) -> str:
        run = subprocess.run([sys.executable, "-c", self.KILL, deployment], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, **self.cluster.env()})
        if run.returncode:
            raise RuntimeError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "kill failed")
        return run.stdout.strip().splitlines()[-1]

    def lose_node(self, deployment: str) -> str:
        """SIGKILL every process of the node that runs a replica of ``deployment`` (a vanished machine)."""
        names = self.cluster.node_names()
        node = names[self.cluster.replicas(deployment)[0]["node_id"]]
        self.cluster.kill_node(node)
        return f"{node} (SIGKILL of its process group)"

    def stop(self) -> None:
        self.cluster.stop()
        shutil.rmtree(self.state, ignore_errors=True)


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the API may be briefly unreachable
            pass
        time.sleep(1)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")


def prime(base: str, mix: list[Kind], timeout_s: float = 300, burst: int = 8) -> None:
    """One ok request of each kind (first loads, demo model builds), retried for up to ``timeout_s``; then
    ``burst`` concurrent requests of each kind, twice: every replica reaches the batch sizes the clients
    can give it (its memory peak) before warm-up ends; a fault later sends all clients to the survivors."""
    limits = httpx.Limits(max_connections=burst + 2, max_keepalive_connections=burst + 2)
    with httpx.Client(timeout=120, limits=limits) as client, ThreadPoolExecutor(burst) as pool:
        for kind in mix:
            deadline = time.time() + timeout_s
            while (outcome := send(client, base, kind, 0))[0] != "ok":
                if time.time() > deadline:
                    raise RuntimeError(f"priming {kind.name}: {outcome}")
                print(f"[soak] priming {kind.name}: {outcome}; retrying", flush=True)
                time.sleep(2)
        for kind in mix:
            outcomes = list(pool.map(lambda i, k=kind: send(client, base, k, i), range(2 * burst)))
            print(f"[soak] burst of {burst} x {kind.name}: {sorted(set(o for o, _ in outcomes))}", flush=True)


def plan(duration_s: float, every_s: float, targets: list[str], node_loss_at_s: float | None = None,
         tail_s: float = 45) -> list[tuple[float, str, str]]:
    """(seconds from start, action, target) of each fault: a replica kill every ``every_s`` while one
    still leaves ``tail_s`` to recover before the end; the node loss if asked."""
    events = [(k * every_s, "kill replica", targets[(k - 1) % len(targets)])
              for k in range(1, int((duration_s - tail_s) // every_s) + 1)]
    if node_loss_at_s is not None:
        events.append((node_loss_at_s, "lose node", CHAT))  # the worker node that runs the chat model
    return sorted(events)


def soak(base: str, mix: list[Kind], *, duration_s: float, warmup_s: float, faults: list[tuple[float, str, str]],
         inject: Callable[[str, str], str], roots: list[int], clients: int = 8, timeout_s: float = 60,
         sample_every_s: float = 10, exclude: set[int] | None = None) -> Run:
    """Run the mix against ``base`` for ``duration_s`` with ``faults`` (see :func:`plan`);
    ``inject(action, target)`` injects one and returns what it hit. Returns what was measured."""
    t0 = time.time()
    sampler = Sampler(rss_probe(roots, exclude if exclude is not None else {os.getpid()}), sample_every_s).start()
    loop = MixLoop(base, mix, clients, timeout_s).start()
    injected: list[Fault] = []
    try:
        for at, action, target in faults:
            time.sleep(max(0.0, t0 + at - time.time()))
            fault = Fault(time.time(), action, target)
            try:
                fault.victim = inject(action, target)
                fault.t = time.time()  # done: a cluster's kill runs in a driver that takes seconds to start
            except Exception as exc:  # reported as a failed check, the run goes on
                fault.error = f"{type(exc).__name__}: {exc}"[:200]
            print(f"[soak] {fault.t - t0:6.0f} s {action} {target}: {fault.error or fault.victim}", flush=True)
            injected.append(fault)
        time.sleep(max(0.0, t0 + duration_s - time.time()))
    finally:
        t_end = time.time()
        results, stuck = loop.stop()
        samples = sampler.stop()
    return Run(t0, t_end, t0 + warmup_s, results, injected, samples, stuck,
               meta={"clients": clients, "timeout_s": timeout_s, "mix": {k.name: k.weight for k in mix}})


def machine(load: float) -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (load average {load:.1f} at "
            "start; client and server on the same machine)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--cluster", action="store_true", help="the local 3-node cluster, + one node loss")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--warmup", type=float, default=120, help="seconds before memory/latency baselines")
    parser.add_argument("--fault-every", type=float, default=300, help="seconds between replica kills")
    parser.add_argument("--targets", default=",".join(TARGETS), help="deployments to kill, in turn")
    parser.add_argument("--node-loss-at", type=float, default=None,
                        help="seconds from start (cluster; default: half-way, between two replica kills)")
    parser.add_argument("--timeout", type=float, default=120,
                        help="client read timeout (seconds without a byte): longer = a hang")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between RSS samples")
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--p99-tolerance", type=float, default=1.5, help="recovered: p99 <= this x baseline")
    parser.add_argument("--recovery-limit", type=float, default=30, help="seconds a fault may take to recover")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="local mode: CPUs Ray declares")
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml", help="local mode")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak")
    opts = parser.parse_args(argv)

    duration = opts.minutes * 60
    node_loss = None
    if opts.cluster:
        node_loss = opts.node_loss_at if opts.node_loss_at is not None else duration / 2 + opts.fault_every / 2
    faults = plan(duration, opts.fault_every, opts.targets.split(","), node_loss)
    server = ClusterServer() if opts.cluster else LocalServer(opts.config, opts.num_cpus)
    load = os.getloadavg()[0]
    print(f"[soak] {opts.minutes:g} min, faults at {[(round(a), t) for a, _, t in faults]}; starting the server",
          flush=True)
    base = server.start()
    try:
        mix = default_mix()
        prime(base, mix, burst=opts.clients)
        print(f"[soak] {base} ready (every kind answered, alone and in bursts); load for {duration:.0f} s", flush=True)

        def inject(action: str, target: str) -> str:
            return server.kill_replica(target) if action == "kill replica" else server.lose_node(target)

        run = soak(base, mix, duration_s=duration, warmup_s=opts.warmup, faults=faults, inject=inject,
                   roots=server.roots(), clients=opts.clients, timeout_s=opts.timeout,
                   sample_every_s=opts.sample_every)
    finally:
        server.stop()
    run.meta.update(mode=server.mode, server=server.describe,
                    command="python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
                    machine=machine(load))
    report = analyse(run, rss_tolerance=opts.rss_tolerance, p99_tolerance=opts.p99_tolerance,
                     recovery_limit_s=opts.recovery_limit)
    paths = write(run, report, opts.out)
    print((opts.out.with_suffix(".md")).read_text())
    print("[soak] wrote " + ", ".join(map(str, paths)))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
