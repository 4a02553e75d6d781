"""``build_app``: the application builder named by serve_config.yaml's ``import_path``.

One deployment per configured model (named :attr:`ModelSpec.deployment_name`, class chosen by task),
all bound into one :class:`OpenAIIngress`. Options given here are defaults; the ``deployments:`` section
of the Serve config overrides them the Ray Serve way.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray.serve import Application

from app.config import AppArgs, ModelSpec
from app.ingress import OpenAIIngress
from deployments.llm import LLMDeployment
from deployments.whisper import WhisperDeployment

# Which deployment class serves a task.
TASKS = {"chat": LLMDeployment, "transcription": WhisperDeployment}


def model_deployment(spec: ModelSpec, **ray_options: Any) -> Application:
    """Bind the deployment of one model with defaults sized to its batching; ``ray_options``
    (Ray Serve deployment options) override them."""
    batching = spec.batching
    options = {
        "name": spec.deployment_name,
        # Room for a full batch being prefilled while others decode; must be >= max_batch_size.
        "max_ongoing_requests": max(2 * batching.max_batch_size, batching.max_running_rows),
        "max_queued_requests": 256,
        "user_config": batching.model_dump(),
        **ray_options,
    }
    return TASKS[spec.task].options(**options).bind(spec)


def build_app(args: AppArgs) -> Application:
    """Serve builder entry point: Serve validates the YAML ``args`` against :class:`AppArgs`."""
    return compose_app(args)


def compose_app(args: AppArgs | Mapping[str, Any],
                deployment_options: Mapping[str, Mapping[str, Any]] | None = None) -> Application:
    """``build_app`` for Python callers (tests, bench): ``deployment_options`` maps a deployment name to
    Ray Serve options, as the ``deployments:`` section of a Serve config does for ``serve run``."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    extra = dict(deployment_options or {})
    handles = {spec.id: model_deployment(spec, **extra.pop(spec.deployment_name, {}))
               for spec in args.models}
    ingress = {"max_ongoing_requests": args.ingress.max_ongoing_requests, **extra.pop("OpenAIIngress", {})}
    if extra:
        raise ValueError(f"deployment_options name unknown deployments: {sorted(extra)}")
    return OpenAIIngress.options(**ingress).bind(list(args.models), handles, args.ingress)
