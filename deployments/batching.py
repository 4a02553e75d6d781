"""Batching settings of a model replica: ``user_config`` validated against the deployment's limits."""

from __future__ import annotations

from typing import Any

from ray import serve

from app.config import BatchingSpec, ModelSpec


def batching_from_user_config(spec: ModelSpec, user_config: dict[str, Any] | None) -> BatchingSpec:
    """``spec.batching`` updated with ``user_config`` (a partial :class:`BatchingSpec`).

    Raises ValueError, which fails the deploy with this message, when the replica's
    ``max_ongoing_requests`` is below ``max_batch_size``: such a batch could never fill.
    """
    batching = BatchingSpec.model_validate({**spec.batching.model_dump(), **(user_config or {})})
    max_ongoing = replica_max_ongoing_requests()
    if max_ongoing is not None and max_ongoing < batching.max_batch_size:
        raise ValueError(
            f"deployment {spec.deployment_name!r}: max_ongoing_requests ({max_ongoing}) must be >= "
            f"max_batch_size ({batching.max_batch_size}), or batches can never fill; raise "
            "max_ongoing_requests or lower user_config.max_batch_size")
    return batching


def replica_max_ongoing_requests() -> int | None:
    """This replica's max_ongoing_requests, or None outside a replica."""
    try:
        return serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # not inside a replica (unit tests) or Ray moved the private field
        return None
