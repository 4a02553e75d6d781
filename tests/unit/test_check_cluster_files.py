"""The deployment files in cluster/ and the GPU production config: they validate against the schemas of
the tools that read them, and agree with each other (a drift fails here, not on a cluster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from app.check import check_file

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
GPU_CONFIG = ROOT / "serve_config.gpu.yaml"

QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9.]+([KMGTPE]i?|[mkMGTPE])?$"}]}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}  # rayStartParams: strings only
CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"},
    "resources": {"type": "object", "additionalProperties": False, "properties": {
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "requests": {"type": "object", "additionalProperties": QUANTITY}}},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}}}}
POD = {"type": "object", "required": ["spec"], "properties": {
    "metadata": {"type": "object"},
    "spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER}}}}}
# The part of KubeRay's ray.io/v1 RayService CRD (ray-operator/config/crd/bases/ray.io_rayservices.yaml)
# that this manifest uses, with the CRD's field names at each level: an unknown or misspelt field, a
# non-string rayStartParams value or a malformed quantity fails. (The full CRD is 800 kB of OpenAPI; with
# a cluster at hand, `kubectl apply --dry-run=server -f cluster/rayservice.yaml` checks all of it.)
RAYSERVICE_V1 = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["serveConfigV2", "rayClusterConfig"],
                 "properties": {
                     "serveConfigV2": {"type": "string"},
                     "serviceUnhealthySecondThreshold": {"type": "integer"},
                     "deploymentUnhealthySecondThreshold": {"type": "integer"},
                     "excludeHeadPodFromServeSvc": {"type": "boolean"},
                     "rayClusterDeletionDelaySeconds": {"type": "integer"},
                     "serveService": {"type": "object"}, "upgradeStrategy": {"type": "object"},
                     "rayClusterConfig": {
                         "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                         "properties": {
                             "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                             "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
                                 "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                                 "idleTimeoutSeconds": {"type": "integer"}, "image": {"type": "string"},
                                 "imagePullPolicy": {"type": "string"}, "resources": {"type": "object"},
                                 "env": {"type": "array"}, "envFrom": {"type": "array"},
                                 "securityContext": {"type": "object"}, "volumeMounts": {"type": "array"},
                                 "version": {"type": "string"}}},
                             "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["template"],
                                               "properties": {"rayStartParams": STRINGS, "template": POD,
                                                              "serviceType": {"type": "string"},
                                                              "headService": {"type": "object"},
                                                              "enableIngress": {"type": "boolean"}}},
                             "workerGroupSpecs": {"type": "array", "items": {
                                 "type": "object", "additionalProperties": False,
                                 "required": ["groupName", "maxReplicas", "minReplicas", "template"],
                                 "properties": {"groupName": {"type": "string"},
                                                "replicas": {"type": "integer", "minimum": 0},
                                                "minReplicas": {"type": "integer", "minimum": 0},
                                                "maxReplicas": {"type": "integer", "minimum": 0},
                                                "numOfHosts": {"type": "integer"},
                                                "idleTimeoutSeconds": {"type": "integer"},
                                                "suspend": {"type": "boolean"}, "scaleStrategy": {"type": "object"},
                                                "rayStartParams": STRINGS, "template": POD}}},
                             "headServiceAnnotations": {"type": "object"}, "suspend": {"type": "boolean"},
                             "managedBy": {"type": "string"}, "gcsFaultToleranceOptions": {"type": "object"}}}}}},
}


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def gpu_config() -> dict:
    return yaml.safe_load(GPU_CONFIG.read_text())


def test_the_rayservice_manifest_validates_against_the_rayservice_v1_schema():
    jsonschema.validate(manifest(), RAYSERVICE_V1)


@pytest.mark.parametrize("mutate", [
    lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update({"maxReplica": 3}),
    lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    ["resources"]["limits"].update({"memory": "48 gigs"}),
], ids=["non-string-ray-start-param", "misspelt-field", "bad-quantity"])
def test_the_schema_catches_the_usual_mistakes(mutate):
    m = manifest()
    mutate(m)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, RAYSERVICE_V1)


def test_serve_config_v2_is_exactly_serve_config_gpu_yaml():
    assert yaml.safe_load(manifest()["spec"]["serveConfigV2"]) == gpu_config()
    run = subprocess.run([sys.executable, "cluster/render_rayservice.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_the_render_script_detects_and_repairs_drift():
    sys.path.insert(0, str(ROOT / "cluster"))
    from render_rayservice import render

    drifted = MANIFEST.read_text().replace("max_replicas: 4", "max_replicas: 40", 1)
    assert drifted != MANIFEST.read_text()
    assert render(drifted, GPU_CONFIG.read_text()) == MANIFEST.read_text()


def gpu_replicas(config: dict) -> tuple[int, int]:
    """(min, max) GPUs the config's model deployments may hold together."""
    lo = hi = 0
    for d in config["applications"][0]["deployments"]:
        gpus = (d.get("ray_actor_options") or {}).get("num_gpus") or 0
        auto = d.get("autoscaling_config") or {}
        lo += gpus * auto.get("min_replicas", d.get("num_replicas", 1))
        hi += gpus * auto.get("max_replicas", d.get("num_replicas", 1))
    return lo, hi


def test_the_rayservice_cluster_fits_the_serve_config():
    cluster = manifest()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]  # a CPU head
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    lo, hi = gpu_replicas(gpu_config())
    assert group["minReplicas"] * gpus_per_pod >= lo and group["maxReplicas"] * gpus_per_pod >= hi
    metrics = cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"]
    assert group["rayStartParams"]["metrics-export-port"] == metrics
    for container in (head, worker):
        assert int(metrics) in {p["containerPort"] for p in container["ports"]}
        assert 8000 in {p["containerPort"] for p in container["ports"]}
    assert cluster["rayVersion"] == __import__("ray").__version__


def ray_up_schema() -> dict:
    """The schema `ray up` validates a cluster config with (shipped inside Ray)."""
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_ray_up_config_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "cluster" / "ray-up.yaml").read_text())
    jsonschema.validate(config, ray_up_schema())
    gpu = config["available_node_types"]["gpu_worker"]
    lo, hi = gpu_replicas(gpu_config())  # one GPU per node: a node per model replica
    assert gpu["min_workers"] >= lo and gpu["max_workers"] >= hi and config["max_workers"] >= hi
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert any("serve deploy serve_config.gpu.yaml" in c for c in config["head_start_ray_commands"])


def test_ray_up_schema_rejects_a_typo():
    config = yaml.safe_load((ROOT / "cluster" / "ray-up.yaml").read_text())
    config["head_start_ray_command"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_up_schema())


def test_the_gpu_config_passes_the_check_and_puts_each_model_replica_on_one_gpu():
    assert [p for p in check_file(GPU_CONFIG) if p.error] == []
    config = gpu_config()
    app = config["applications"][0]
    assert config["proxy_location"] == "EveryNode"
    models = {m.get("deployment") or m["id"]: m for m in app["args"]["models"]}
    for d in app["deployments"]:
        if d["name"] in models:
            assert d["ray_actor_options"]["num_gpus"] == 1
            assert models[d["name"]]["dtype"] == "bfloat16"
            auto = d["autoscaling_config"]
            assert {"min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                    "downscale_delay_s"} <= set(auto)
            assert auto["target_ongoing_requests"] <= d["max_ongoing_requests"]


def test_the_local_and_gpu_configs_differ_only_where_they_must():
    local, gpu = yaml.safe_load((ROOT / "serve_config.yaml").read_text()), gpu_config()
    assert set(local) == set(gpu) and local["proxy_location"] == gpu["proxy_location"]
    assert local["http_options"] == gpu["http_options"]
    la, ga = local["applications"][0], gpu["applications"][0]
    assert {k: la[k] for k in ("name", "route_prefix", "import_path")} == \
        {k: ga[k] for k in ("name", "route_prefix", "import_path")}
    assert [m["task"] for m in la["args"]["models"]] == [m["task"] for m in ga["args"]["models"]]
    # Same metrics push settings; the GPU config adds only the offline hub switch.
    assert la["runtime_env"]["env_vars"].items() <= ga["runtime_env"]["env_vars"].items()
    # Both autoscale their chat model out of the box with the same knobs.
    chat = [next(d for d in a["deployments"] if d["name"] == (m.get("deployment") or m["id"]))
            for a in (la, ga) for m in a["args"]["models"] if m["task"] == "chat"]
    assert set(chat[0]["autoscaling_config"]) == set(chat[1]["autoscaling_config"])


def test_every_way_to_start_the_server_selects_the_fast_serving_path():
    """The README's serve command, the image (KubeRay) and `ray up` set every variable of FAST_PATH_ENV, and
    the connection timeout of CONNECTION_ENV (README: Connection limits)."""
    from app.local import CONNECTION_ENV, FAST_PATH_ENV

    settings = [f"{name}={value}" for name, value in {**FAST_PATH_ENV, **CONNECTION_ENV}.items()]
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "serve run serve_config.yaml" in line
                   and line.startswith("python3 -m venv"))
    docker_env = next(line for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
                      if line.startswith("ENV RAY_SERVE_"))
    ray_up = yaml.safe_load((ROOT / "cluster" / "ray-up.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in ray_up[key]
              if "ray start" in c]
    for text in (command, docker_env, *starts):
        assert all(setting in text for setting in settings), text


def test_every_config_lets_replicas_exchange_messages_over_grpc_s_default_size():
    """Under the fast path the app's replicas talk gRPC, whose default 4 MiB message limit would fail a
    bigger audio upload (measured: a 5.3 MB wav got a 500): the configs and app.local raise it alike."""
    from app.local import REPLICA_ENV

    for config in (yaml.safe_load((ROOT / "serve_config.yaml").read_text()), gpu_config()):
        assert REPLICA_ENV.items() <= config["applications"][0]["runtime_env"]["env_vars"].items()
