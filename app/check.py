"""``python -m app.check serve_config.yaml [more.yaml ...]``: validate Serve configs offline.

Checks, without Ray running and without loading torch:

1. Ray's own schema, ``ray.serve.schema.ServeDeploySchema`` (what ``serve deploy`` would refuse);
2. the ``args`` of every application whose ``import_path`` is this project's builder, against
   :class:`app.config.AppArgs` (what ``serve deploy`` would only report once the app is building);
3. the rules that tie ``args`` to the ``deployments:`` section, which neither schema can see: every entry
   names a model's deployment or the ingress; a model's ``user_config`` is a valid partial batching spec
   of its task (a bad one is refused by the replica at runtime, which then keeps its old settings);
   ``max_ongoing_requests`` (given, or the builder's default) is at least the effective
   ``max_batch_size``; GPU options agree with the model's ``device``; an ``autoscaling_config``'s
   ``target_ongoing_requests`` is reachable, and a custom engine-load policy's ``policy_kwargs`` are valid.

Every problem is printed as ``file: path: message`` with the YAML path of the field
(``applications[0].deployments[1].user_config.max_batch_size``); warnings do not fail the check. The exit
status is 1 when any file has an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from app.auth import parse_key_file
from app.builder import AUTOSCALING_POLICIES, INGRESS_NAME, deployment_defaults, directory_name
from app.config import AppArgs

# import paths whose `args` are AppArgs.
BUILDER_PATHS = ("app.builder:build_app",)


@dataclass(frozen=True)
class Problem:
    """One finding: where (a YAML path), what, and whether it fails the check."""

    path: str
    message: str
    error: bool = True

    def __str__(self) -> str:
        return f"{'' if self.error else 'warning: '}{self.path}: {self.message}"


def yaml_path(loc: Iterable[Any], prefix: str = "") -> str:
    """``("applications", 0, "args")`` -> ``applications[0].args``."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _data_loc(loc: tuple[Any, ...], data: Any) -> list[Any]:
    """The part of a pydantic error location that exists in ``data``: unions add the tag of each
    alternative (``models.0.chat.audio``, ``num_replicas.constrained-int``), which is no YAML key. The
    last part is kept even when absent (a missing required field)."""
    out: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, Mapping) and part in node or isinstance(node, list) and isinstance(part, int) \
                and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif i == len(loc) - 1 and isinstance(node, Mapping):
            out.append(part)
    return out


def _pydantic_problems(exc: ValidationError, prefix: str, data: Any) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors():
        problem = Problem(yaml_path(_data_loc(err["loc"], data), prefix) or "<root>", err["msg"])
        if problem not in problems:
            problems.append(problem)
    return problems


def _ray_schemas() -> dict[str, Any]:
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    return {"": ServeDeploySchema, "http_options": HTTPOptionsSchema, "applications": ServeApplicationSchema,
            "deployments": DeploymentSchema, "ray_actor_options": RayActorOptionsSchema,
            "autoscaling_config": AutoscalingConfig, "policy": AutoscalingPolicy}


def unknown_keys(config: Mapping[str, Any]) -> list[Problem]:
    """Keys that Ray Serve's schemas silently ignore (a typo such as ``max_ongoing:``)."""
    schemas = _ray_schemas()
    problems: list[Problem] = []

    def walk(node: Any, schema_key: str, path: str) -> None:
        if not isinstance(node, Mapping):
            return
        fields = schemas[schema_key].model_fields
        for key, value in node.items():
            at = f"{path}.{key}" if path else str(key)
            if key not in fields:
                problems.append(Problem(at, f"unknown key (Ray Serve would ignore it silently); known: "
                                            f"{', '.join(sorted(fields))}"))
            elif key in schemas and isinstance(value, list):
                for k, item in enumerate(value):
                    walk(item, key, f"{at}[{k}]")
            elif key in schemas:
                walk(value, key, at)

    walk(config, "", "")
    return problems


def check_config(config: Any) -> list[Problem]:
    """All problems of one parsed Serve config (see the module docstring)."""
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, Mapping):
        return [Problem("<root>", "a Serve config is a mapping with an `applications:` list")]
    problems: list[Problem] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # Ray's FutureWarnings: future errors
            warnings.simplefilter("always")
            ServeDeploySchema.model_validate(dict(config))
        problems += [Problem("<root>", str(w.message), error=False) for w in caught
                     if not issubclass(w.category, DeprecationWarning)]
    except ValidationError as exc:
        problems += _pydantic_problems(exc, "", config)
    except Exception as exc:  # e.g. an autoscaling policy whose import path does not import
        problems.append(Problem("<root>", f"Ray Serve refuses the config: {exc}"))
    problems += unknown_keys(config)
    for i, app in enumerate(config.get("applications") or []):
        if isinstance(app, Mapping) and app.get("import_path") in BUILDER_PATHS:
            problems += check_application(app, f"applications[{i}]")
    return problems


def check_application(app: Mapping[str, Any], where: str) -> list[Problem]:
    """The ``args`` of one application of this project, and its ``deployments:`` against them."""
    try:
        args = AppArgs.model_validate(app.get("args") or {})
    except ValidationError as exc:
        return _pydantic_problems(exc, f"{where}.args", app.get("args") or {})
    specs = {spec.deployment_name: spec for spec in args.models}
    # Deployments the builder adds besides the models': the ingress, and with on_demand the
    # multiplexed deployment and its model directory (their own option rules are Ray's).
    others = {INGRESS_NAME}
    if getattr(args, "on_demand", None) is not None:
        others |= {args.on_demand.deployment, directory_name(args.on_demand)}
    problems: list[Problem] = []
    deployments = app.get("deployments") or []
    for j, entry in enumerate(deployments):
        if not isinstance(entry, Mapping):
            continue  # the schema check reported it
        at = f"{where}.deployments[{j}]"
        name = entry.get("name")
        if name == INGRESS_NAME:
            if entry.get("user_config") is not None:
                problems.append(Problem(f"{at}.user_config", "the ingress takes no user_config"))
        elif name in specs:
            problems += check_model_deployment(specs[name], entry, at)
        elif name not in others:
            problems.append(Problem(f"{at}.name", (
                f"{name!r} names no deployment of this app; known: {sorted([*specs, *others])} "
                "(a model's deployment is its `deployment` field, else its id with characters outside "
                "[A-Za-z0-9._-] as '-')")))
    configured = {e.get("name") for e in deployments if isinstance(e, Mapping)}
    for k, spec in enumerate(args.models):
        if spec.deployment_name not in configured:  # the builder's defaults apply: still check them
            problems += check_model_deployment(spec, {}, f"{where}.args.models[{k}]")
    runtime_env = app.get("runtime_env") if isinstance(app.get("runtime_env"), Mapping) else {}
    env = runtime_env.get("env_vars") if isinstance(runtime_env.get("env_vars"), Mapping) else {}
    return (problems + _image_problems(args.ingress.images, f"{where}.args.ingress.images")
            + _auth_problems(args.ingress.auth, f"{where}.args.ingress.auth", env))


def _auth_problems(auth: Any, at: str, app_env: Mapping[str, Any]) -> list[Problem]:
    """API keys (README: Authentication): a key file that is here but malformed is an error (the ingress
    would not start); a source missing here, or keys written into the config itself, are warnings."""
    problems = []
    if auth.api_keys_env and auth.api_keys_env in app_env:
        problems.append(Problem(f"{at}.api_keys_env", f"runtime_env.env_vars sets {auth.api_keys_env}: the keys "
                                "are then in the config; set the variable where Ray starts instead", False))
    elif auth.api_keys_env and not os.environ.get(auth.api_keys_env):
        problems.append(Problem(f"{at}.api_keys_env", f"{auth.api_keys_env} is not set here; the ingress refuses "
                                "to start where it finds no key", False))
    if auth.api_keys_file:
        try:
            parse_key_file(Path(auth.api_keys_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            problems.append(Problem(f"{at}.api_keys_file", f"{auth.api_keys_file!r} cannot be read on this machine",
                                    False))
        except ValueError as exc:
            problems.append(Problem(f"{at}.api_keys_file", str(exc)))
    return problems


def _image_problems(images: Any, at: str) -> list[Problem]:
    """Warnings on where image URLs may point (README: Images): warnings, since the config may be meant
    for other machines than this one."""
    problems = []
    if images.allow_remote and not images.allowed_hosts:
        problems.append(Problem(f"{at}.allow_remote", "remote images from any host: clients can make the server "
                                "fetch internal addresses; list `allowed_hosts` unless clients are trusted", False))
    if images.file_root is not None and not Path(images.file_root).is_dir():
        problems.append(Problem(f"{at}.file_root", f"{images.file_root!r} is not a directory on this machine", False))
    return problems


def check_model_deployment(spec: Any, entry: Mapping[str, Any], at: str) -> list[Problem]:
    """The cross-field rules of one model's ``deployments:`` entry (``{}`` = builder defaults only)."""
    problems: list[Problem] = []
    batching = spec.batching
    user_config = entry.get("user_config")
    if user_config is not None:
        if not isinstance(user_config, Mapping):
            return [Problem(f"{at}.user_config", "must be a mapping of batching fields")]
        try:
            batching = type(spec.batching).model_validate({**spec.batching.model_dump(), **user_config})
        except ValidationError as exc:
            problems += _pydantic_problems(exc, f"{at}.user_config", user_config)
            batching = None
    max_ongoing = entry.get("max_ongoing_requests")
    explicit = max_ongoing is not None
    if not explicit:
        max_ongoing = deployment_defaults(spec)["max_ongoing_requests"]
    if batching is not None and isinstance(max_ongoing, int) and max_ongoing < batching.max_batch_size:
        where = "user_config.max_batch_size" if user_config and "max_batch_size" in user_config else (
            "max_ongoing_requests" if explicit else "batching.max_batch_size")
        problems.append(Problem(f"{at}.{where}", (
            f"max_batch_size ({batching.max_batch_size}) exceeds max_ongoing_requests ({max_ongoing}"
            f"{'' if explicit else ', the builder default'}): such a batch can never fill (a replica "
            "refuses this user_config and keeps its old settings)")))
    problems += _gpu_problems(spec, entry.get("ray_actor_options") or {}, at)
    problems += _autoscaling_problems(spec, entry.get("autoscaling_config"), max_ongoing, batching, at)
    return problems


def _gpu_problems(spec: Any, actor: Mapping[str, Any], at: str) -> list[Problem]:
    gpus = actor.get("num_gpus") or 0
    if not isinstance(gpus, (int, float)):
        return []
    problems = []
    if gpus > 0 and spec.device == "cpu":
        problems.append(Problem(f"{at}.ray_actor_options.num_gpus", (
            f"{gpus} GPU(s) reserved for model {spec.id!r} whose device is 'cpu': the GPU would sit idle; "
            "set device: auto (or cuda), or num_gpus: 0")))
    if gpus == 0 and spec.device == "cuda":
        problems.append(Problem(f"{at}.ray_actor_options.num_gpus", (
            f"model {spec.id!r} has device 'cuda' but its replicas get no GPU (num_gpus 0): Ray hides "
            "every GPU from them; set num_gpus: 1")))
    if gpus > 0 and getattr(spec, "prefill_threads", None):
        problems.append(Problem(f"{at}.ray_actor_options.num_gpus", (
            f"model {spec.id!r} sets prefill_threads (CPU only) but its replicas run on a GPU"), error=False))
    if gpus == 0 and spec.dtype in ("float16", "bfloat16"):
        problems.append(Problem(f"{at}.ray_actor_options.num_gpus", (
            f"model {spec.id!r} asks for dtype {spec.dtype} on a CPU replica: fast only where the CPU has "
            "native bf16 (AVX512-BF16, AMX), and even there slower than float32's fast path at 1-8 rows "
            "(README: Quantized weights)"), error=False))
    return problems


def _autoscaling_problems(spec: Any, auto: Any, max_ongoing: Any, batching: Any, at: str) -> list[Problem]:
    if not isinstance(auto, Mapping):
        return []
    problems = []
    target = auto.get("target_ongoing_requests")
    policy = auto.get("policy") or {}
    custom = isinstance(policy, Mapping) and policy.get("policy_function") not in (None, "default")
    if isinstance(target, (int, float)) and isinstance(max_ongoing, int) and target > max_ongoing:
        problems.append(Problem(f"{at}.autoscaling_config.target_ongoing_requests", (
            f"{target} is above max_ongoing_requests ({max_ongoing}): a replica never holds that many "
            "requests, so the default policy would never scale up")))
    if target is None and not custom:
        problems.append(Problem(f"{at}.autoscaling_config.target_ongoing_requests", (
            "not set: Ray's default of 2 scales out long before a batch fills; size it to the batch "
            f"(e.g. {batching.max_batch_size if batching else 8})"), error=False))
    if custom and policy.get("policy_function") in AUTOSCALING_POLICIES:
        kwargs_schema, tasks = AUTOSCALING_POLICIES[policy["policy_function"]]
        if spec.task not in tasks:
            problems.append(Problem(f"{at}.autoscaling_config.policy.policy_function", (
                f"{policy['policy_function']} reads what {'/'.join(tasks)} engines report; model "
                f"{spec.id!r} is a {spec.task} model: use the default policy")))
        try:
            kwargs_schema.model_validate(policy.get("policy_kwargs") or {})
        except ValidationError as exc:
            problems += _pydantic_problems(exc, f"{at}.autoscaling_config.policy.policy_kwargs",
                                           policy.get("policy_kwargs") or {})
    return problems


def check_file(path: str | Path) -> list[Problem]:
    """Problems of the YAML file at ``path`` (a YAML syntax error is one problem)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [Problem("<file>", str(exc))]
    return check_config(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="Serve config YAML files")
    parsed = parser.parse_args(argv)
    failed = False
    for path in parsed.configs:
        problems = check_file(path)
        errors = [p for p in problems if p.error]
        for problem in problems:
            print(f"{path}: {problem}")
        print(f"{path}: {'FAILED, ' + str(len(errors)) + ' error(s)' if errors else 'ok'}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
