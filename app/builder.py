"""``build_app``: the application builder named by serve_config.yaml's ``import_path``.

One deployment per configured model (named :attr:`ModelSpec.deployment_name`, class chosen by task),
all bound into one :class:`OpenAIIngress`. Options given here are defaults; the ``deployments:`` section
of the Serve config overrides them the Ray Serve way.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from app.config import AppArgs, ModelSpec
from app.ingress import OpenAIIngress
from deployments.llm import LLMDeployment

# Which deployment class serves a task.
TASKS = {"chat": LLMDeployment}


def model_deployment(spec: ModelSpec) -> Application:
    """Bind the deployment of one model with defaults sized to its batching."""
    batching = spec.batching
    return TASKS[spec.task].options(
        name=spec.deployment_name,
        # Room for a full batch being prefilled while others decode; must be >= max_batch_size.
        max_ongoing_requests=max(2 * batching.max_batch_size, batching.max_running_rows),
        max_queued_requests=256,
        user_config=batching.model_dump(),
    ).bind(spec)


def build_app(args: AppArgs) -> Application:
    """Serve builder entry point: Serve validates the YAML ``args`` against :class:`AppArgs`."""
    if not isinstance(args, AppArgs):  # called from Python with a dict
        args = AppArgs.model_validate(args)
    handles = {spec.id: model_deployment(spec) for spec in args.models}
    return OpenAIIngress.options(max_ongoing_requests=args.ingress.max_ongoing_requests).bind(
        list(args.models), handles)
