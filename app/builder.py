"""``build_app``: the application builder named by serve_config.yaml's ``import_path``.

Each pinned model gets its own deployment (named :attr:`deployment_name`; class by task, from
:data:`TASKS`), all bound into one :class:`OpenAIIngress`; with an ``on_demand`` section, so are the
multiplexed deployment that loads every other allowed model and its model directory. Options given here
are defaults; the ``deployments:`` section of the Serve config overrides them the Ray Serve way. Importing this module
loads no torch: deployment modules import their engines only inside the replicas.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray.serve import Application

from app.config import AppArgs, OnDemandSpec
from app.ingress import OpenAIIngress
from deployments.autoscaling import POLICY_PATH, EngineLoadArgs
from deployments.embedding import EmbeddingDeployment
from deployments.llm import LLMDeployment
from deployments.multiplexed import ModelDirectory, MultiplexedChatDeployment
from deployments.pipeline import PipelineDeployment
from deployments.whisper import WhisperDeployment

# Which deployment class serves a task.
TASKS = {"chat": LLMDeployment, "transcription": WhisperDeployment, "embedding": EmbeddingDeployment,
         "fill-mask": PipelineDeployment}
# Custom Serve autoscaling policies this app ships: import path -> (schema of its policy_kwargs, the
# tasks whose engines report what it reads). `python -m app.check` validates configs against it.
AUTOSCALING_POLICIES = {POLICY_PATH: (EngineLoadArgs, ("chat",))}
INGRESS_NAME = "OpenAIIngress"


def deployment_defaults(spec: Any) -> dict[str, Any]:
    """Ray options of a model's deployment before the config's ``deployments:`` section applies."""
    batching = spec.batching
    return {
        "name": spec.deployment_name,
        # Room for a full batch being admitted while others run; must be >= max_batch_size.
        "max_ongoing_requests": max(2 * batching.max_batch_size, getattr(batching, "max_running_rows", 0)),
        "max_queued_requests": 256,
        # Ray notices a dead replica at its next health check (default every 10 s); until then its model
        # looks ready and requests wait for it. 2 s bounds that wait (app/availability.py) cheaply.
        "health_check_period_s": 2.0,
        "user_config": batching.model_dump(),
    }


def model_deployment(spec: Any, **ray_options: Any) -> Application:
    """Bind the deployment of one model; ``ray_options`` (Ray Serve deployment options) override the
    defaults of :func:`deployment_defaults`."""
    return TASKS[spec.task].options(**{**deployment_defaults(spec), **ray_options}).bind(spec)


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
    on_demand = {}
    if args.on_demand is not None:
        on_demand = on_demand_deployments(args.on_demand, extra.pop(args.on_demand.deployment, {}),
                                          extra.pop(directory_name(args.on_demand), {}))
    ingress = {"max_ongoing_requests": args.ingress.max_ongoing_requests, **extra.pop(INGRESS_NAME, {})}
    if extra:
        raise ValueError(f"deployment_options name unknown deployments: {sorted(extra)}")
    return OpenAIIngress.options(**ingress).bind(list(args.models), handles, args.ingress,
                                                 on_demand=args.on_demand, **on_demand)


def directory_name(on_demand: OnDemandSpec) -> str:
    return f"{on_demand.deployment}-directory"


def on_demand_deployments(on_demand: OnDemandSpec, ray_options: Mapping[str, Any],
                          directory_options: Mapping[str, Any]) -> dict[str, Application]:
    """The multiplexed deployment (named ``on_demand.deployment``) and its model directory, bound."""
    directory = ModelDirectory.options(name=directory_name(on_demand), **directory_options).bind()
    most_rows = max(e.batching.max_running_rows for e in on_demand.allow)
    defaults = {"name": on_demand.deployment, "max_queued_requests": 256,
                "max_ongoing_requests": max(64, on_demand.max_models_per_replica * most_rows)}
    multiplexed = MultiplexedChatDeployment.options(**{**defaults, **ray_options}).bind(on_demand, directory)
    return {"multiplexed": multiplexed, "directory": directory}
