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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_locally(args: Mapping[str, Any], deployment_options: Mapping[str, Mapping[str, Any]] | None = None,
                  *, port: int | None = None, num_cpus: int = 4, env: Mapping[str, str] | None = None,
                  timeout_s: float = 120.0) -> str:
    """Start Ray and Serve, deploy ``compose_app(args, deployment_options)`` as app ``openai`` at ``/``;
    return its base URL. Stop it with ``serve.shutdown(); ray.shutdown()``."""
    import ray
    import requests
    from ray import serve

    from app.builder import compose_app

    port = port or free_port()
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **(env or {})}})
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
