"""One local 3-node Ray cluster (cluster/local_cluster.py) for the tests of this directory.

The cluster is started once per session, in a state dir of its own, and stopped at the end by its
process groups. The app is deployed with `serve deploy` from serve_config.yaml, changed only where this
machine needs it (see :func:`cluster.local_cluster.local_serve_config`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from app.local import free_port
from cluster.local_cluster import LocalCluster, local_serve_config


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def local_cluster():
    """(LocalCluster, base URL, config path): the app deployed with `serve deploy` on 3 nodes."""
    state = Path(tempfile.mkdtemp(prefix="stc-", dir="/tmp"))  # short: Ray's socket paths are bounded
    cluster = LocalCluster(state)
    try:
        cluster.start(workers=2, head_cpus=1, worker_cpus=2)
        port = free_port()
        config = local_serve_config(port)
        path = write_config(config, state / "serve_config.yaml")
        run = cluster.cli("serve", "deploy", str(path))
        assert run.returncode == 0, run.stdout + run.stderr
        wait_running(cluster, timeout_s=300)
        yield cluster, f"http://127.0.0.1:{port}", path
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def wait_running(cluster: LocalCluster, timeout_s: float = 240) -> dict:
    """Wait until the app is RUNNING and every deployment HEALTHY; return the Serve details."""
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            last = cluster.serve_details()
            app = (last.get("applications") or {}).get("openai") or {}
            if app.get("status") == "RUNNING" and all(
                    d["status"] == "HEALTHY" for d in app.get("deployments", {}).values()):
                return last
        except Exception as exc:  # the dashboard may be restarting its Serve module
            last = exc
        time.sleep(1)
    raise AssertionError(f"app not RUNNING/HEALTHY after {timeout_s} s: {last}")

