"""The shape every model deployment shares: an injected engine behind ``@serve.batch`` admission.

:class:`BatchedDeployment` holds the spec and the engine (built by an injected factory, so a test can
hand it a fake), admits requests to the engine in ``@serve.batch`` groups, streams each request's
records back, applies ``user_config`` at runtime, and reports stats and health. A subclass adds only its
public method(s): turn a wire request into engine requests, then ``yield`` from :meth:`_stream`.

Live config rule (``reconfigure``): an invalid ``user_config`` never stops a replica. The replica keeps
the settings it had (a new replica: the spec's ``batching``), logs the reason at ERROR, and reports it
as ``config_error`` in :meth:`stats` (and so in ``/health``) until a valid ``user_config`` arrives. So a
bad ``serve deploy`` cannot take a serving model down; ``python -m app.check`` refuses it beforehand.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, AsyncIterator, Callable

from pydantic import ValidationError
from ray import serve

from app.config import BatchingSpec
from deployments.logs import install_client_error_filter
from deployments.metrics import observe, watch_engines

logger = logging.getLogger(__name__)

# However many streams are open, a stream's tokens are not held back longer than this.
_MAX_STREAM_INTERVAL_S = 0.25


def load_factory(path: str) -> Callable[[Any], Any]:
    """``"module:function"`` -> the function (default engine factories are named, not imported, so that
    importing a deployment class, as the app builder does, loads no torch)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def batching_from_user_config(spec: Any, user_config: dict[str, Any] | None) -> BatchingSpec:
    """``spec.batching`` updated with ``user_config`` (a partial batching spec of the model's task).

    Raises ValueError naming the field for an unknown or invalid field, and when the replica's
    ``max_ongoing_requests`` is below ``max_batch_size`` (such a batch could never fill).
    """
    try:
        batching = type(spec.batching).model_validate({**spec.batching.model_dump(), **(user_config or {})})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"]))
        raise ValueError(f"deployment {spec.deployment_name!r}: user_config.{field}: {first['msg']}") from None
    max_ongoing = replica_max_ongoing_requests()
    if max_ongoing is not None and max_ongoing < batching.max_batch_size:
        raise ValueError(
            f"deployment {spec.deployment_name!r}: max_ongoing_requests ({max_ongoing}) must be >= "
            f"user_config.max_batch_size ({batching.max_batch_size}), or batches can never fill; raise "
            "max_ongoing_requests or lower user_config.max_batch_size")
    return batching


def replica_max_ongoing_requests() -> int | None:
    """This replica's max_ongoing_requests, or None outside a replica."""
    try:
        return serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # not inside a replica (unit tests) or Ray moved the private field
        return None


class BatchedDeployment:
    """Base of the model deployments (see the module docstring). ``default_factory`` names the engine
    factory used when none is injected."""

    default_factory: str = ""

    def __init__(self, spec: Any, engine_factory: Callable[[Any], Any] | None = None) -> None:
        install_client_error_filter()  # a 4xx raised to the caller is logged as one INFO line
        self.spec = spec
        self.engine = observe(spec.id, (engine_factory or load_factory(self.default_factory))(spec))
        if replica_max_ongoing_requests() is not None:  # in a replica (not a unit test): export gauges
            watch_engines(lambda: {spec.id: self.engine})
        self._streams = 0  # requests being streamed (queued or generating)
        self.config_error: str | None = None
        self._apply(spec.batching)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply ``user_config`` (a partial batching spec) without a restart; see the live config rule."""
        try:
            batching = batching_from_user_config(self.spec, user_config)
        except ValueError as exc:
            self.config_error = str(exc)
            logger.error("user_config refused, keeping %s: %s", self.batching.model_dump(), exc)
            return
        self.config_error = None
        self._apply(batching)

    def _apply(self, batching: BatchingSpec) -> None:
        self.batching = batching
        self._admit.set_max_batch_size(batching.max_batch_size)
        self._admit.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.engine.apply(batching)

    async def _stream(self, request: Any) -> AsyncIterator[list[Any]]:
        """Admit ``request`` (with whatever else arrives for the same @serve.batch) and stream its
        records. Leaving early (the caller went away) cancels it in the engine.

        Each yielded list is one Ray message (and one SSE event at the ingress). After the first, a
        stream that supports ``hold`` is paced by :meth:`stream_interval`: records produced in between
        travel together, so the message rate stays within what the path carries."""
        self._streams += 1
        try:
            stream = await self._admit(request)
            hold = getattr(stream, "hold", None)
            async for items in stream:
                yield items
                if hold is not None:
                    hold(self.stream_interval())
        finally:
            self._streams -= 1
            request.cancelled = True  # frees the request's engine rows, even if it is still queued

    def stream_interval(self) -> float:
        """Gap before a stream's next message: the batching's ``stream_interval_s``, stretched so that
        all open streams together send at most ``stream_messages_per_s`` messages (0 when unset)."""
        floor = getattr(self.batching, "stream_interval_s", 0.0)
        budget = getattr(self.batching, "stream_messages_per_s", None)
        if not budget:
            return floor
        return max(floor, min(_MAX_STREAM_INTERVAL_S, self._streams / budget))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _admit(self, requests: list[Any]) -> list[Any]:
        """One @serve.batch group goes to the engine together. Returns at once (the streams are
        in-process objects), so the next group can form while this one is served."""
        return self.engine.submit(requests)

    def stats(self) -> dict[str, Any]:
        """Engine counters, the live batching settings, any refused user_config and the replica's pid."""
        return {**self.engine.stats(), "batching": self.batching.model_dump(),
                "config_error": self.config_error, "pid": os.getpid()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics hook: the engine's numeric counters (running and
        waiting rows, waiting prompt tokens, ...), read by ``deployments.autoscaling.EngineLoadPolicy``."""
        return {k: float(v) for k, v in self.engine.stats().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    async def check_health(self) -> None:
        """Ray Serve's replica health check (and /health's probe): answering proves the event loop runs."""
