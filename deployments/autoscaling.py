"""Replica autoscaling driven by the engine's own load, not by ongoing-request counts.

Ray Serve's default policy scales on ongoing requests per replica, averaged over ``look_back_period_s``.
For a continuous-batching engine that count is a poor proxy: the work a replica holds is its decoding
rows (``n`` choices are ``n`` rows) plus the prompts waiting to be prefilled, and a window average
reacts to a burst only after the window has filled. :class:`EngineLoadPolicy` reads what every model
replica reports through ``record_autoscaling_stats`` (see ``deployments/batched.py``: the engine's
``stats()``) and asks for

    ceil((running_rows + waiting_rows over all replicas + requests queued at callers) / target_rows)

replicas, at least one more than now while any replica's waiting prompt tokens exceed
``max_waiting_prefill_tokens`` (it cannot admit what it was given). It scales up on the latest report of
each replica and down on the window average, so it reacts to a burst at once and does not flap. Serve
applies ``min_replicas``/``max_replicas`` and ``upscale_delay_s``/``downscale_delay_s`` around it.

Select it per deployment in the Serve config::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      policy:
        policy_function: deployments.autoscaling:EngineLoadPolicy
        policy_kwargs: {target_rows: 32, max_waiting_prefill_tokens: 2048}

This module imports neither Ray nor torch: Serve's controller imports it (and so does the config check).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

POLICY_PATH = "deployments.autoscaling:EngineLoadPolicy"
# Engine stats (GenerationEngine.stats) that the policy reads.
RUNNING, WAITING, WAITING_TOKENS = "running_rows", "waiting_rows", "waiting_prefill_tokens"


class EngineLoadArgs(BaseModel):
    """``policy_kwargs`` of :class:`EngineLoadPolicy` (validated by ``python -m app.check`` too)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_rows: float = Field(gt=0, description=(
        "Rows (decoding sequences plus sequences waiting for prefill) one replica should hold; size it "
        "below the model's max_running_rows so a replica is added before requests start to wait."))
    max_waiting_prefill_tokens: int = Field(0, ge=0, description=(
        "A replica with more prompt tokens than this waiting for prefill is saturated: the policy asks "
        "for one more replica than now whatever the row count says. 0 disables this trigger."))


def _latest(series: Any) -> float:
    """The newest value of a Serve TimeSeries (a list of TimeStampedValue); 0 when empty."""
    return float(max(series, key=lambda p: p.timestamp).value) if series else 0.0


def desired_replicas(current: int, latest: Mapping[str, Mapping[Any, float]],
                     averaged: Mapping[str, Mapping[Any, float]], queued: float, args: EngineLoadArgs) -> float:
    """The replica count the engines' load asks for (before Serve's bounds and delays).

    ``latest``/``averaged`` map a metric name to {replica: value}: the newest report and the look-back
    average. Up on the newest values, down only as far as the average allows.
    """
    if current == 0:
        return 1.0 if queued > 0 else 0.0

    def rows(metrics: Mapping[str, Mapping[Any, float]]) -> float:
        return sum(metrics.get(RUNNING, {}).values()) + sum(metrics.get(WAITING, {}).values()) + queued

    want = max(rows(latest), rows(averaged)) / args.target_rows
    saturated = args.max_waiting_prefill_tokens and any(
        v > args.max_waiting_prefill_tokens for v in latest.get(WAITING_TOKENS, {}).values())
    if saturated:
        want = max(want, current + 1)
    return math.ceil(want) if want > 0 else 0.0


class EngineLoadPolicy:
    """Serve custom autoscaling policy (a class: Serve instantiates it once with ``policy_kwargs``)."""

    def __init__(self, **kwargs: Any) -> None:
        self.args = EngineLoadArgs.model_validate(kwargs)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """``ctx`` is Serve's AutoscalingContext; returns (desired replicas, policy state)."""
        raw = ctx.raw_metrics or {}
        latest = {name: {r: _latest(s) for r, s in per_replica.items()} for name, per_replica in raw.items()}
        averaged = ctx.aggregated_metrics or {}
        queued = float(ctx.total_queued_requests or 0.0)
        if not latest.get(RUNNING) and not averaged.get(RUNNING):
            # No engine reports yet (replicas starting): hold, rather than scale on nothing.
            return ctx.target_num_replicas, {}
        want = desired_replicas(ctx.current_num_replicas, latest, averaged, queued, self.args)
        return want, {"engine_load_want": want}
