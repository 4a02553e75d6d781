"""Connection limits and stopping (README: Connection limits; Quick start): every way to start the fast path
bounds HAProxy's wait for a client's request, and the local config stops in seconds while the cluster
config keeps Ray's draining period for its load balancers."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.local import CONNECTION_ENV, fast_path_env

ROOT = Path(__file__).resolve().parents[2]
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def config(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def deployment(cfg: dict, name: str) -> dict:
    return next(d for d in cfg["applications"][0]["deployments"] if d["name"] == name)


def test_every_way_to_start_the_fast_path_bounds_haproxy_s_client_timeout():
    """Ray's default (3600 s) let a few thousand silent connections keep every client out; the setting
    must be where Ray's processes start: the image, `ray up`'s start commands, serve_locally."""
    settings = [f"{name}={value}" for name, value in CONNECTION_ENV.items()]
    docker_env = next(line for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
                      if line.startswith("ENV RAY_SERVE_"))
    ray_up = config("cluster/ray-up.yaml")
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in ray_up[key]
              if "ray start" in c]
    for text in (docker_env, *starts):
        assert all(setting in text for setting in settings), text
    assert CONNECTION_ENV.items() <= fast_path_env().items()
    assert 0 < int(CONNECTION_ENV["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"]) <= 30


def test_the_local_config_stops_in_seconds_and_the_cluster_keeps_its_drain():
    local, gpu = config("serve_config.yaml"), config("serve_config.gpu.yaml")
    drain = [deployment(c, "OpenAIIngress")["ray_actor_options"]["runtime_env"]["env_vars"][DRAIN]
             for c in (local, gpu)]
    assert drain[0] == fast_path_env()[DRAIN] == "1" and float(drain[1]) >= 30
    for d in local["applications"][0]["deployments"]:
        if d["name"] != "OpenAIIngress":   # the ingress drains behind HAProxy without a wait loop
            assert d["graceful_shutdown_wait_loop_s"] <= 0.5, d["name"]


def test_idle_keep_alive_outlasts_cloud_load_balancers():
    """Connections idle between requests stay open longer than an L7 balancer's pool (AWS ALB: 60 s), or
    it would reuse ones the server has just closed (502s)."""
    for name in ("serve_config.yaml", "serve_config.gpu.yaml"):
        assert config(name)["http_options"]["keep_alive_timeout_s"] > 60
