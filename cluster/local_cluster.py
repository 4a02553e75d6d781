"""A multi-node Ray cluster on one machine: a head and N workers started with ``ray start``.

    python cluster/local_cluster.py start            # head + 2 workers; prints the env to use
    eval "$(python cluster/local_cluster.py env)"    # RAY_ADDRESS, token auth, for serve/ray CLIs
    serve deploy serve_config.yaml && serve status
    python cluster/local_cluster.py kill-worker 1    # SIGKILL one worker node (a node loss)
    python cluster/local_cluster.py stop             # stops exactly the processes this script started

Each node is one ``ray start --block`` process, started in a session of its own; Ray's processes of that
node (GCS, raylet, dashboard agents, workers) belong to it, and ``stop`` signals exactly those process
groups (recorded in the state file) — never ``ray stop``, which would kill every Ray instance on the
machine. Nodes get distinct ports (found free at start), and the cluster its own temp dir, so it can run
next to other Ray instances. Workers advertise ``{"fake_gpu": 1}``: a custom resource standing in for a
GPU, so that a config can place one model replica per "GPU node" as ``num_gpus: 1`` does on a real
cluster. Token authentication is on (Ray >= 2.52), with a token generated for this cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE = Path(os.environ.get("LOCAL_CLUSTER_DIR") or f"/tmp/stc-{os.getuid()}")
NAME_RESOURCE = "local_cluster_node_"
WORKER_PORTS = 40  # worker processes per node (each takes a port)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _port_block(size: int, taken: set[int]) -> int:
    """First port of ``size`` consecutive free ports (not in ``taken``), searched from a random base."""
    for _ in range(200):
        base = 20000 + secrets.randbelow(35000)
        block = range(base, base + size)
        if not taken.intersection(block) and all(_free(p) for p in block):
            taken.update(block)
            return base
    raise RuntimeError("no free port block found")


class LocalCluster:
    """Start/stop/inspect the cluster whose state lives in ``state_dir`` (``state.json``)."""

    def __init__(self, state_dir: Path = DEFAULT_STATE) -> None:
        self.dir = Path(state_dir)
        self.state_file = self.dir / "state.json"

    # --- state -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))

    def env(self) -> dict[str, str]:
        """What a client of this cluster needs: the serve/ray CLIs read these."""
        s = self.state()
        return {"RAY_ADDRESS": f"127.0.0.1:{s['gcs_port']}",
                "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{s['dashboard_port']}",
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{s['dashboard_port']}",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.dir / "token"),
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self, workers: int = 2, head_cpus: float = 1, worker_cpus: float = 2,
              worker_resources: dict | None = None, timeout_s: float = 180) -> dict:
        if self.state().get("nodes"):
            raise SystemExit(f"a cluster is already recorded in {self.state_file}; stop it first")
        if self.dir.exists() and any(self.dir.iterdir()) and not self.state_file.exists():
            raise SystemExit(f"{self.dir} exists and holds no cluster state: choose another --dir")
        shutil.rmtree(self.dir, ignore_errors=True)  # a previous cluster's logs and session files
        (self.dir / "logs").mkdir(parents=True)
        (self.dir / "token").write_text(secrets.token_hex(32))
        taken: set[int] = set()
        head = _port_block(8, taken)
        state = {"gcs_port": head, "dashboard_port": head + 1, "client_port": head + 2, "nodes": [],
                 "temp_dir": str(self.dir / "ray"), "started": time.time()}
        self._save(state)
        self._start_node(state, "head", head_cpus, {}, [
            "--head", f"--port={head}", f"--dashboard-port={head + 1}", f"--ray-client-server-port={head + 2}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={state['temp_dir']}"],
            extra_ports=head + 3, taken=taken)
        self.wait_for_nodes(1, timeout_s)
        for i in range(1, workers + 1):
            # One at a time: nodes sharing a session dir pick their socket names (raylet.1, ...) at
            # start, and two starting together can pick the same one. `ray start` gives a raylet 30 s
            # to register, which a busy machine can exceed: then the node exits, and we try again.
            for attempt in range(1, 4):
                self._start_node(state, f"worker{i}", worker_cpus, worker_resources or {"fake_gpu": 1},
                                 [f"--address=127.0.0.1:{head}"], extra_ports=_port_block(5, taken),
                                 taken=taken)
                try:
                    self.wait_for_nodes(1 + i, timeout_s)
                    break
                except RuntimeError:
                    failed = state["nodes"].pop()
                    _signal_group(failed["pgid"], signal.SIGKILL)
                    self._save(state)
                    log = self.dir / "logs" / f"worker{i}.log"
                    log.rename(log.with_suffix(f".attempt{attempt}.log"))
                    if attempt == 3:
                        raise
        return state

    def _start_node(self, state: dict, name: str, cpus: float, resources: dict, args: list[str],
                    extra_ports: int, taken: set[int]) -> None:
        """Start one node (``extra_ports``..+4: its node manager, object manager, metrics and agent
        ports); ``taken`` holds the ports already given to other nodes of this cluster."""
        worker_base = _port_block(WORKER_PORTS, taken)
        p = extra_ports
        # A resource named after the node lets the State API's node list say which node is which.
        resources = {**resources, f"{NAME_RESOURCE}{name}": 1}
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
               f"--num-cpus={cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
               "--node-ip-address=127.0.0.1", f"--node-manager-port={p}", f"--object-manager-port={p + 1}",
               f"--metrics-export-port={p + 2}", f"--dashboard-agent-listen-port={p + 3}",
               f"--dashboard-agent-grpc-port={p + 4}", f"--runtime-env-agent-port={_port_block(1, taken)}",
               f"--min-worker-port={worker_base}", f"--max-worker-port={worker_base + WORKER_PORTS - 1}",
               "--object-store-memory=200000000", *args]
        env = {**os.environ, **self.env(), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS")  # ray start takes --address; RAY_ADDRESS would make the head join itself
        with open(self.dir / "logs" / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        state["nodes"].append({"name": name, "pid": proc.pid, "pgid": proc.pid, "cpus": cpus,
                               "resources": resources, "node_manager_port": p, "metrics_port": p + 2})
        self._save(state)

    def _api(self, path: str) -> dict:
        s = self.state()
        req = urllib.request.Request(f"http://127.0.0.1:{s['dashboard_port']}{path}", headers={
            "Authorization": f"Bearer {(self.dir / 'token').read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes, from the State API (node_id, node_ip, resources_total, ...)."""
        out = self._api("/api/v0/nodes?limit=100&detail=true")
        return [n for n in out["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def node_names(self) -> dict[str, str]:
        """Ray node id -> this script's name for it (head, worker1, ...), from its name resource."""
        return {n["node_id"]: next((k[len(NAME_RESOURCE):] for k in n["resources_total"]
                                    if k.startswith(NAME_RESOURCE)), "?") for n in self.alive_nodes()}

    def serve_details(self) -> dict:
        """Serve's REST API (what `serve status` reads): applications, deployments, replicas with
        their node ids, proxies."""
        return self._api("/api/serve/applications/")

    def replicas(self, deployment: str, app: str = "openai", state: str | None = "RUNNING") -> list[dict]:
        """Replicas of one deployment from the Serve API (``state=None``: all states)."""
        apps = self.serve_details().get("applications") or {}
        deps = (apps.get(app) or {}).get("deployments") or {}
        reps = (deps.get(deployment) or {}).get("replicas") or []
        return [r for r in reps if state is None or r["state"] == state]

    def cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """Run a ray/serve CLI command against this cluster (its address and token in the env)."""
        exe = Path(sys.executable).with_name(args[0])
        return subprocess.run([str(exe), *args[1:]], env={**os.environ, **self.env()}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout_s)

    def wait_for_nodes(self, n: int, timeout_s: float = 180) -> list[dict]:
        deadline = time.time() + timeout_s
        last: Exception | str = "no answer"
        while time.time() < deadline:
            self._check_processes()
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= n:
                    return nodes
                last = f"{len(nodes)} alive"
            except Exception as exc:  # dashboard not up yet
                last = exc
            time.sleep(1)
        raise RuntimeError(f"cluster did not reach {n} alive nodes in {timeout_s:g} s ({last}); "
                           f"logs in {self.dir / 'logs'}")

    def _check_processes(self) -> None:
        for node in self.state().get("nodes", []):
            if not node.get("killed") and not _alive(node["pid"]):
                raise RuntimeError(f"node {node['name']} exited; see {self.dir / 'logs' / (node['name'] + '.log')}")

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node (a machine that vanished): no graceful shutdown."""
        state = self.state()
        node = next(n for n in state["nodes"] if n["name"] == name)
        _signal_group(node["pgid"], signal.SIGKILL)
        node["killed"] = True
        self._save(state)

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the nodes this script started (workers first), by their process groups only."""
        state = self.state()
        nodes = list(reversed(state.get("nodes", [])))
        for node in nodes:
            _signal_group(node["pgid"], signal.SIGTERM)
        deadline = time.time() + timeout_s
        while time.time() < deadline and any(_group_alive(n["pgid"]) for n in nodes):
            time.sleep(0.5)
        for node in nodes:
            _signal_group(node["pgid"], signal.SIGKILL)
        state["nodes"] = []
        self._save(state)


# serve_config.yaml's chat model and its deployment (a real model: SmolLM2-135M-Instruct, from a wheel).
CHAT = "SmolLM2-135M-Instruct"


def local_serve_config(port: int, chat_policy: dict | None = None) -> dict:
    """serve_config.yaml for this local cluster, changed only where one shared machine needs it:

    - the HTTP port (pick a free one: other servers may run here) on loopback (the other ``http_options``
      stay);
    - the chat model's replicas take a worker's ``fake_gpu`` (standing in for ``num_gpus: 1``: one replica per
      "GPU node") and half a CPU;
    - autoscaling reacts in seconds rather than the shipped tens of seconds, to keep tests short;
    - ``chat_policy``: an ``autoscaling_config.policy`` for the chat model (default: Ray's).
    """
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": port}
    chat = next(d for d in config["applications"][0]["deployments"] if d["name"] == CHAT)
    chat["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": 0, "resources": {"fake_gpu": 1}}
    chat["autoscaling_config"].update(upscale_delay_s=2, downscale_delay_s=8, look_back_period_s=12)
    if chat_policy:
        chat["autoscaling_config"]["policy"] = chat_policy
    return config


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_STATE, help="state dir (default %(default)s)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="start a head and workers")
    start.add_argument("--workers", type=int, default=2)
    start.add_argument("--head-cpus", type=float, default=1)
    start.add_argument("--worker-cpus", type=float, default=2)
    sub.add_parser("env", help="print shell exports for the serve/ray CLIs")
    sub.add_parser("status", help="alive nodes and their resources")
    kill = sub.add_parser("kill-worker", help="SIGKILL one worker node")
    kill.add_argument("index", type=int)
    sub.add_parser("stop", help="stop the nodes this script started")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    if args.cmd == "start":
        cluster.start(args.workers, args.head_cpus, args.worker_cpus)
        print(f"# {1 + args.workers} nodes up; dashboard http://127.0.0.1:{cluster.state()['dashboard_port']}")
        args.cmd = "env"
    if args.cmd == "env":
        print("\n".join(f"export {k}={v}" for k, v in cluster.env().items()))
    elif args.cmd == "status":
        for n in cluster.alive_nodes():
            print(n["node_id"][:12], "head" if n["is_head_node"] else "worker", n["resources_total"])
    elif args.cmd == "kill-worker":
        cluster.kill_node(f"worker{args.index}")
    elif args.cmd == "stop":
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
