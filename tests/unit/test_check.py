"""``python -m app.check``: every shipped config passes; each kind of bad config is refused with the
YAML path of the offending field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.check import check_config, check_file

ROOT = Path(__file__).resolve().parents[2]
CHAT = "SmolLM2-135M-Instruct"  # serve_config.yaml's chat model and its deployment


def shipped_configs() -> list[Path]:
    """Every Serve config in the repository (a YAML file with an `applications:` list)."""
    found = []
    for path in sorted(ROOT.glob("**/*.yaml")):
        if any(part.startswith(".") or part in ("node_modules", "build") for part in path.relative_to(ROOT).parts):
            continue
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "applications" in data:
            found.append(path)
    return found


def test_the_repository_ships_the_configs_we_expect():
    names = {p.relative_to(ROOT).as_posix() for p in shipped_configs()}
    assert {"serve_config.yaml", "serve_config.gpu.yaml"} <= names


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_config_passes(path):
    errors = [p for p in check_file(path) if p.error]
    assert errors == [], "\n".join(map(str, errors))


def base() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def app(config: dict) -> dict:
    return config["applications"][0]


def entry(config: dict, name: str) -> dict:
    return next(d for d in app(config)["deployments"] if d["name"] == name)


def model(config: dict, model_id: str) -> dict:
    return next(m for m in app(config)["args"]["models"] if m["id"] == model_id)


def idx(config: dict, name: str) -> int:
    return [d["name"] for d in app(config)["deployments"]].index(name)


def autoscale(config: dict, name: str, autoscaling_config: dict) -> None:
    entry(config, name).pop("num_replicas", None)
    entry(config, name)["autoscaling_config"] = autoscaling_config


# (id, mutation, expected YAML path of the reported field, a word the message must contain)
BAD = [
    ("args-typo", lambda c: model(c, CHAT).__setitem__("batchng", {}),
     "applications[0].args.models[0].batchng", "Extra inputs"),
    ("args-field-of-other-task", lambda c: model(c, CHAT).__setitem__("audio", {}),
     "applications[0].args.models[0].audio", "Extra inputs"),
    ("args-bad-value", lambda c: model(c, CHAT)["batching"].__setitem__("max_batch_size", 0),
     "applications[0].args.models[0].batching.max_batch_size", "greater than"),
    ("ray-schema-bad-replicas", lambda c: entry(c, "demo-whisper").__setitem__("num_replicas", -1),
     "applications[0].deployments[2].num_replicas", "greater than 0"),
    ("ray-schema-unknown-option", lambda c: entry(c, CHAT).__setitem__("max_ongoing", 3),
     "applications[0].deployments[1].max_ongoing", "unknown key"),
    ("ray-schema-unknown-actor-option",
     lambda c: entry(c, CHAT)["ray_actor_options"].__setitem__("num_gpu", 1),
     "applications[0].deployments[1].ray_actor_options.num_gpu", "unknown key"),
    ("deployment-names-no-model", lambda c: entry(c, CHAT).__setitem__("name", "demo_chat"),
     "applications[0].deployments[1].name", "names no deployment"),
    ("on-demand-deployment-misspelt", lambda c: entry(c, "on-demand").__setitem__("name", "ondemand"),
     "applications[0].deployments[3].name", "names no deployment"),
    ("user-config-unknown-field", lambda c: entry(c, CHAT)["user_config"].__setitem__("max_batch", 4),
     "applications[0].deployments[1].user_config.max_batch", "Extra inputs"),
    ("user-config-field-of-other-task",
     lambda c: entry(c, "demo-whisper")["user_config"].__setitem__("max_running_rows", 4),
     "applications[0].deployments[2].user_config.max_running_rows", "Extra inputs"),
    ("user-config-batch-above-max-ongoing",
     lambda c: entry(c, CHAT)["user_config"].__setitem__("max_batch_size", 65),
     "applications[0].deployments[1].user_config.max_batch_size", "max_ongoing_requests (64)"),
    ("max-ongoing-below-args-batch", lambda c: entry(c, CHAT).__setitem__("max_ongoing_requests", 4)
     or entry(c, CHAT).pop("user_config"),
     "applications[0].deployments[1].max_ongoing_requests", "can never fill"),
    ("gpu-on-cpu-model", lambda c: (entry(c, CHAT)["ray_actor_options"].update(num_gpus=1),
                                    model(c, CHAT).update(device="cpu")),
     "applications[0].deployments[1].ray_actor_options.num_gpus", "device is 'cpu'"),
    # A quantization method on a device it cannot run on: refused in the args (so at build time too).
    ("bnb-on-cpu", lambda c: model(c, CHAT).update(quantization="bnb-4bit", device="cpu"),
     "applications[0].args.models[0].quantization", "runs on cuda only"),
    ("int8-device-auto", lambda c: model(c, CHAT).update(quantization="int8"),
     "applications[0].args.models[0].quantization", "set `device: cpu`"),
    ("bnb-without-gpu", lambda c: model(c, CHAT).update(quantization="bnb-8bit", device="cuda"),
     "applications[0].deployments[1].ray_actor_options.num_gpus", "no GPU"),
    ("cuda-without-gpu", lambda c: model(c, "demo-whisper").update(device="cuda"),
     "applications[0].deployments[2].ray_actor_options.num_gpus", "no GPU"),
    ("ingress-user-config", lambda c: entry(c, "OpenAIIngress").__setitem__("user_config", {"a": 1}),
     "applications[0].deployments[0].user_config", "no user_config"),
    ("autoscaling-target-unreachable",
     lambda c: autoscale(c, CHAT, {"min_replicas": 1, "max_replicas": 2,
                                                                "target_ongoing_requests": 100}),
     "applications[0].deployments[1].autoscaling_config.target_ongoing_requests", "never scale up"),
    ("engine-policy-bad-kwargs", lambda c: autoscale(c, CHAT, {
        "min_replicas": 1, "max_replicas": 2,
        "policy": {"policy_function": "deployments.autoscaling:EngineLoadPolicy",
                   "policy_kwargs": {"target_row": 8}}}),
     "applications[0].deployments[1].autoscaling_config.policy.policy_kwargs.target_row", "Extra inputs"),
    ("engine-policy-on-whisper", lambda c: autoscale(c, "demo-whisper", {
        "min_replicas": 1, "max_replicas": 2,
        "policy": {"policy_function": "deployments.autoscaling:EngineLoadPolicy",
                   "policy_kwargs": {"target_rows": 8}}}),
     "applications[0].deployments[2].autoscaling_config.policy.policy_function", "transcription"),
    ("policy-does-not-import", lambda c: autoscale(c, CHAT, {
        "min_replicas": 1, "max_replicas": 2, "policy": {"policy_function": "nowhere.at_all:policy"}}),
     "<root>", "nowhere"),
]


@pytest.mark.parametrize("mutate,path,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_config_is_refused_naming_the_field(mutate, path, words):
    config = copy.deepcopy(base())
    assert [p for p in check_config(config) if p.error] == []
    mutate(config)
    errors = [p for p in check_config(config) if p.error]
    assert errors, "the bad config passed"
    assert any(p.path == path and words in p.message for p in errors), "\n".join(map(str, errors))


def test_a_missing_autoscaling_target_is_a_warning_not_an_error():
    config = base()
    entry(config, "demo-whisper").pop("num_replicas")
    entry(config, "demo-whisper")["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2}
    problems = check_config(config)
    assert [p for p in problems if p.error] == []
    assert any(p.path.endswith("autoscaling_config.target_ongoing_requests") for p in problems)


def test_not_a_mapping_and_not_yaml(tmp_path):
    assert check_config(["applications"])[0].error
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [\n")
    assert check_file(bad)[0].path == "<file>"


def test_the_command_line_exit_status_and_output(tmp_path):
    config = base()
    entry(config, CHAT)["user_config"]["max_batch_size"] = 1000
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "app.check", str(ROOT / "serve_config.yaml"), str(bad)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{ROOT / 'serve_config.yaml'}: ok" in run.stdout
    assert "applications[0].deployments[1].user_config.max_batch_size" in run.stdout
    good = subprocess.run([sys.executable, "-m", "app.check", str(ROOT / "serve_config.yaml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr


def test_the_check_loads_no_model_libraries():
    code = ("import sys, app.check; app.check.check_file('serve_config.yaml'); "
            "print(sorted({'torch', 'transformers', 'av'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_serve_build_works_on_the_module_level_app(tmp_path):
    """`serve build app.main:app` (Ray's own config generator) writes a config Ray accepts, listing
    every deployment of the repo's serve_config.yaml."""
    out = tmp_path / "built.yaml"
    serve = Path(sys.executable).with_name("serve")
    run = subprocess.run([str(serve), "build", "app.main:app", "--app-dir", str(ROOT), "-o", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    built = yaml.safe_load(out.read_text())
    names = {d["name"] for d in built["applications"][0]["deployments"]}
    configured = {d["name"] for d in app(base())["deployments"]}
    assert configured <= names  # plus what the builder adds unconfigured (the on-demand directory)
    assert [p for p in check_config(built) if p.error] == []


def test_image_url_policy_warnings_and_errors(tmp_path):
    config = base()
    args = config["applications"][0]["args"]
    args["ingress"] = {"images": {"allow_remote": True, "file_root": str(tmp_path / "missing")}}
    problems = check_config(config)
    assert [p for p in problems if p.error] == []
    warned = {p.path.rsplit(".", 1)[-1] for p in problems if not p.error}
    assert {"allow_remote", "file_root"} <= warned
    args["ingress"] = {"images": {"allow_remote": True, "allowed_hosts": ["*.example.com"], "file_root": str(tmp_path)}}
    assert not [p for p in check_config(config) if "images" in p.path]
    args["ingress"] = {"images": {"max_bytes": 10}}
    assert [p.path for p in check_config(config) if p.error] == ["applications[0].args.ingress.images.max_bytes"]
