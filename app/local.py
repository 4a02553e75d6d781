"""Run the app on a private local Ray instance from Python (tests, benchmarks, notebooks).

``serve run serve_config.yaml`` is the way to run the server; this is for programs that need a server of
their own: it never attaches to another Ray instance on the machine (``address="local"``), listens on
loopback, and returns once ``/health`` answers.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open while they are picked, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


# Ray Serve's throughput-optimized mode, as the README's `serve run` command sets it (README: "The
# serving path"): HAProxy listens on the HTTP port and forwards to the ingress replica's own HTTP server
# (direct ingress: no Python proxy hop), the ingress calls model replicas over gRPC, and replicas run
# user code on their main event loop. Ray reads these when its processes start, so they must be in the
# environment of whatever starts Ray (`serve run`, `ray start`, or ray.init below).
FAST_PATH_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

# HAProxy's bound on a client connection that has not sent a whole request (README: Connection limits).
# Ray's generated haproxy.cfg sets no `timeout http-request`, so `timeout client` is what closes a
# connection that sends nothing, half a header or half a body. At Ray's default, 3600 s, 4,200 idle
# connections filled HAProxy's 4,096 slots (RAY_SERVE_HAPROXY_MAXCONN) and kept every client out for as
# long as they stayed open. 10 s of silence is far beyond a working client's pauses while it sends; it
# does not cut a client that waits for an answer (the replica computing) nor one idle between requests
# (that is http_options.keep_alive_timeout_s). Like FAST_PATH_ENV, it goes where Ray starts.
CONNECTION_ENV = {"RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "10"}

# What serve_config.yaml's runtime_env gives the app's replicas besides: gRPC messages between them up to
# 2 GiB (Ray's default, 4 MiB, fails an audio upload or a request body above it with a 500).
REPLICA_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2147483647"}


def fast_path_env() -> dict[str, str]:
    """:data:`FAST_PATH_ENV` and :data:`CONNECTION_ENV` for a private local instance: free ports for
    HAProxy's stats and metrics listeners (their fixed defaults, 8404 and 9101, would clash between two
    local instances), and a short drain for a stopping ingress replica."""
    stats, metrics = free_ports(2)
    return {**FAST_PATH_ENV, **CONNECTION_ENV, "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
            # An ingress replica that stops stays open this long so that load balancers can drop it
            # (Ray's default: 30 s, which every shutdown would wait); HAProxy here is on this machine.
            # serve_config.yaml sets the same for its ingress (the cluster keeps 30 s).
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def serve_locally(args: Mapping[str, Any], deployment_options: Mapping[str, Mapping[str, Any]] | None = None,
                  *, port: int | None = None, num_cpus: int = 4, env: Mapping[str, str] | None = None,
                  timeout_s: float = 120.0, fast_path: bool = True, metrics_port: int | None = None) -> str:
    """Start Ray and Serve, deploy ``compose_app(args, deployment_options)`` as app ``openai`` at ``/``;
    return its base URL. Stop it with ``serve.shutdown(); ray.shutdown()``. ``fast_path``: run Ray in
    the mode of :data:`FAST_PATH_ENV` (this process's environment gets those variables, which Ray's
    processes inherit). ``metrics_port``: where Ray's agent exports Prometheus metrics (else a free port
    Ray picks)."""
    if fast_path:
        os.environ.update(fast_path_env())
    import ray
    import requests
    from ray import serve

    from app.builder import compose_app

    port = port or free_port()
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **REPLICA_ENV, **(env or {})}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose_app(args, deployment_options), name="openai", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                return base
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the local server did not become healthy within {timeout_s:g} s")
