"""The model replicas' share of the metrics (the table and the recorders: ``app/metrics.py``).

- :class:`EngineMetrics` is the engine's observer (``deployments/engines/observer.py``): queue, prefill,
  engine TTFT, inter-token gaps, token counts and finish reasons, recorded from the model thread
  (a Ray metric records in about 3 microseconds).
- :func:`watch_engines` samples the engines' ``stats()`` on a thread of its own every
  :data:`SAMPLE_EVERY_S` seconds: the running, waiting and token gauges, and tokens generated.
- :func:`timed` marks a deployment method's first records with the replica's own seconds
  (:class:`~app.streaming.ReplicaTime`), from which the ingress derives the framework's share.
- :class:`PoolMetrics` is the on-demand pool's observer: loads, failures, evictions, load seconds.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from app.metrics import record
from app.streaming import ReplicaTime

logger = logging.getLogger(__name__)

# Ray's agent exports what was recorded every few seconds (RAY_metrics_report_interval_ms, 10 s by
# default): sampling faster than that would only cost CPU.
SAMPLE_EVERY_S = 2.0


class EngineMetrics:
    """The observer of one model's engine (see deployments/engines/observer.py)."""

    def __init__(self, model: str) -> None:
        self.labels = {"model": model}

    def queued(self, seconds: float) -> None:
        record("request_queue_time_seconds", seconds, **self.labels)

    def prefilled(self, seconds: float, prompt_tokens: int) -> None:
        record("request_prefill_time_seconds", seconds, **self.labels)
        record("request_prompt_tokens", prompt_tokens, **self.labels)
        record("prompt_tokens_total", prompt_tokens, **self.labels)

    def first_token(self, seconds: float) -> None:
        record("engine_time_to_first_token_seconds", seconds, **self.labels)

    def inter_token(self, seconds: float) -> None:
        record("inter_token_latency_seconds", seconds, **self.labels)

    def finished(self, reason: str, prompt_tokens: int, generation_tokens: int) -> None:
        record("request_generation_tokens", generation_tokens, **self.labels)
        record("request_success_total", 1, finish_reason=reason, **self.labels)


def observe(model: str, engine: Any) -> Any:
    """``engine`` with its observer set to this model's :class:`EngineMetrics` (engines without one, such
    as the job engines, are left alone)."""
    if hasattr(engine, "observer"):
        engine.observer = EngineMetrics(model)
    return engine


# stats() key -> gauge name
_GAUGES = {"running_rows": "num_running_rows", "max_running_rows": "max_running_rows",
           "waiting_requests": "num_waiting_requests", "waiting_prefill_tokens": "num_waiting_prefill_tokens"}


class _Sampler:
    """Reads ``engines()`` (``{model: engine}``) every period: sets the gauges, adds tokens generated."""

    def __init__(self, engines: Callable[[], dict[str, Any]]) -> None:
        self.engines = engines
        self.generated: dict[int, int] = {}  # id(engine) -> tokens_generated already counted
        self.seen: set[str] = set()

    def sample(self) -> None:
        engines = self.engines()
        for model, engine in engines.items():
            stats = engine.stats()
            for key, gauge in _GAUGES.items():
                if key in stats:
                    record(gauge, stats[key], model=model)
            if "tokens_generated" in stats:
                total = stats["tokens_generated"]
                new = total - self.generated.get(id(engine), 0)
                self.generated[id(engine)] = total
                if new > 0:
                    record("generation_tokens_total", new, model=model)
        for model in self.seen - set(engines):  # unloaded: nothing running or waiting for it here
            for key, gauge in _GAUGES.items():
                record(gauge, 0, model=model)
        self.seen = set(engines)
        live = {id(e) for e in engines.values()}
        self.generated = {k: v for k, v in self.generated.items() if k in live}


def watch_engines(engines: Callable[[], dict[str, Any]], every_s: float = SAMPLE_EVERY_S) -> threading.Thread:
    """Sample ``engines()`` every ``every_s`` seconds on a daemon thread (for the process's life)."""
    sampler = _Sampler(engines)

    def run() -> None:
        while True:
            time.sleep(every_s)
            try:
                sampler.sample()
            except Exception:  # a metric must never take the replica down
                logger.exception("sampling engine metrics failed")

    thread = threading.Thread(target=run, name="metrics-sampler", daemon=True)
    thread.start()
    return thread


def timed(method: Callable[..., AsyncIterator[list[Any]]]) -> Callable[..., AsyncIterator[list[Any]]]:
    """Decorator of a deployment's streaming method: its first list starts with a
    :class:`~app.streaming.ReplicaTime` (seconds from the call to that list)."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[list[Any]]:
        started = time.perf_counter()
        seconds = None
        async with aclosing(method(*args, **kwargs)) as records:  # closed at once when the caller leaves
            async for items in records:
                if seconds is None:
                    seconds = time.perf_counter() - started
                    record("replica_time_to_first_records_seconds", seconds, model=_model(args))
                    items = [ReplicaTime(seconds), *items]
                yield items

    return wrapper


def _model(args: tuple[Any, ...]) -> str:
    """The model of a deployment call ``(self, request, ...)``: the replica's spec, else the request's."""
    spec = getattr(args[0], "spec", None)
    model = getattr(spec, "id", None) or getattr(args[1] if len(args) > 1 else None, "model", None)
    return str(model or "unknown")


class PoolMetrics:
    """The on-demand pool's observer (deployments/pool.py)."""

    def loaded(self, model: str, seconds: float) -> None:
        record("model_loads_total", 1, model=model)
        record("model_load_seconds", seconds, model=model)

    def load_failed(self, model: str) -> None:
        record("model_load_failures_total", 1, model=model)

    def evicted(self, model: str) -> None:
        record("model_evictions_total", 1, model=model)


def count_audio(model: str, seconds: float) -> None:
    record("audio_seconds_total", seconds, model=model)
