"""This server's Prometheus metrics: the table of what it exports, and the ingress's share of them.

Every metric is recorded through Ray Serve's metrics API (``ray.serve.metrics``), so Ray's metrics agent
exports it on each node's metrics port beside Ray's own ``ray_serve_*`` metrics, named ``ray_`` + the
name below, with Serve's ``deployment``, ``replica`` and ``application`` labels added for free.
:data:`METRICS` is the one list of them (the README's Metrics table, ``deployments/metrics.py`` and the
Grafana dashboard's test read it). Histogram buckets follow vLLM's conventions, so dashboards and alert
rules written for vLLM's metrics carry over.

The ingress records what only it sees (:class:`RequestMetrics`): the time to first token and the
end-to-end latency as the client's request experiences them behind HAProxy, errors by code, overload
rejections and cancellations, and ``framework_time_to_first_token_seconds``: the ingress's time to a
request's first records minus the replica's own (its :class:`~app.streaming.ReplicaTime` record), i.e.
the seconds spent in the ingress and on Ray's path, not in the model deployment.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

PREFIX = "serve_transformers_"

# vLLM's buckets (vllm/v1/metrics/loggers.py), in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
# Queue and prefill times are often milliseconds on a small model: TTFT's fine low end.
PHASE_BUCKETS = TTFT_BUCKETS
# vLLM's 1-2-5 series up to the longest context we expect (tokens).
TOKEN_BUCKETS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5))
LOAD_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


@dataclass(frozen=True)
class Metric:
    """One exported metric: ``kind`` is counter, gauge or histogram; ``where`` says which process records
    it (ingress, replica or pool)."""

    kind: str
    labels: tuple[str, ...]
    description: str
    where: str
    buckets: tuple[float, ...] = ()


_MODEL = ("model",)
_ENDPOINT = ("model", "endpoint")

METRICS: dict[str, Metric] = {
    # The ingress: what a client's request experiences.
    "time_to_first_token_seconds": Metric(
        "histogram", _ENDPOINT, "Arrival at the ingress to the request's first generated token (generation "
        "endpoints, streamed or not).", "ingress", TTFT_BUCKETS),
    "e2e_request_latency_seconds": Metric(
        "histogram", _ENDPOINT, "Arrival at the ingress to the end of a complete answer (every model "
        "endpoint; errors and cancellations are counted apart).",
        "ingress", LATENCY_BUCKETS),
    "framework_time_to_first_token_seconds": Metric(
        "histogram", _ENDPOINT, "Of the time to the first records, the part spent outside the model "
        "deployment: the ingress plus Ray's path both ways.", "ingress", TTFT_BUCKETS),
    "requests_total": Metric("counter", ("model", "endpoint", "outcome"),
                             "Requests that ended, by outcome: ok, error or cancelled.", "ingress"),
    "request_errors_total": Metric("counter", ("model", "endpoint", "code"),
                                   "Requests answered with an error, by its OpenAI error code.", "ingress"),
    "overload_rejections_total": Metric("counter", _ENDPOINT, "Requests refused with 503 overloaded (the "
                                        "model's queue was full: max_queued_requests).", "ingress"),
    "request_cancellations_total": Metric("counter", _ENDPOINT, "Requests whose client went away before the "
                                          "answer ended.", "ingress"),
    # A chat model's replica: the engine's figures.
    "request_queue_time_seconds": Metric("histogram", _MODEL, "Submitted to the engine to admitted to a "
                                         "prefill.", "replica", PHASE_BUCKETS),
    "request_prefill_time_seconds": Metric("histogram", _MODEL, "The forward pass of the prefill that held "
                                           "the request.", "replica", PHASE_BUCKETS),
    "engine_time_to_first_token_seconds": Metric("histogram", _MODEL, "Submitted to the engine to its first "
                                                 "token chosen: the engine's share of the TTFT.", "replica",
                                                 TTFT_BUCKETS),
    "replica_time_to_first_records_seconds": Metric(
        "histogram", _MODEL, "A call's arrival at the model replica to its first records (preprocessing "
        "such as the chat template and tokenization, queue, prefill).", "replica", TTFT_BUCKETS),
    "inter_token_latency_seconds": Metric("histogram", _MODEL, "Gap between two consecutive tokens of one "
                                          "choice.", "replica", ITL_BUCKETS),
    "request_prompt_tokens": Metric("histogram", _MODEL, "Prompt tokens per request.", "replica",
                                    TOKEN_BUCKETS),
    "request_generation_tokens": Metric("histogram", _MODEL, "Generated tokens per finished choice.",
                                        "replica", TOKEN_BUCKETS),
    "prompt_tokens_total": Metric("counter", _MODEL, "Prompt tokens prefilled.", "replica"),
    "generation_tokens_total": Metric("counter", _MODEL, "Tokens generated.", "replica"),
    "request_success_total": Metric("counter", ("model", "finish_reason"), "Choices finished, by finish "
                                    "reason (stop, length).", "replica"),
    "num_running_rows": Metric("gauge", _MODEL, "Rows (choices) in the engine's running batch.", "replica"),
    "max_running_rows": Metric("gauge", _MODEL, "The running batch's bound (batching.max_running_rows).",
                               "replica"),
    "num_waiting_requests": Metric("gauge", _MODEL, "Requests submitted to the engine, not yet prefilled.",
                                   "replica"),
    "num_waiting_prefill_tokens": Metric("gauge", _MODEL, "Their prompt tokens.", "replica"),
    "audio_seconds_total": Metric("counter", _MODEL, "Seconds of audio transcribed or translated.", "replica"),
    # The on-demand pool (deployments/pool.py).
    "model_loads_total": Metric("counter", _MODEL, "On-demand model loads.", "pool"),
    "model_load_failures_total": Metric("counter", _MODEL, "On-demand model loads that failed.", "pool"),
    "model_evictions_total": Metric("counter", _MODEL, "On-demand models unloaded to make room.", "pool"),
    "model_load_seconds": Metric("histogram", _MODEL, "Seconds to fetch and load an on-demand model.", "pool",
                                 LOAD_BUCKETS),
}


_RECORD = {"histogram": "observe", "counter": "inc", "gauge": "set"}


def exported_name(name: str) -> str:
    """The name Prometheus scrapes for ``name``: Ray prefixes ``ray_``."""
    return f"ray_{PREFIX}{name}"


@functools.cache
def metric(name: str) -> Any:
    """This process's recorder of ``name`` (a :data:`METRICS` key), made once (Ray Serve's metrics API)."""
    from ray.serve import metrics

    spec = METRICS[name]
    kwargs: dict[str, Any] = {"description": spec.description, "tag_keys": spec.labels}
    if spec.kind == "histogram":
        return metrics.Histogram(PREFIX + name, boundaries=list(spec.buckets), **kwargs)
    return {"counter": metrics.Counter, "gauge": metrics.Gauge}[spec.kind](PREFIX + name, **kwargs)


def record(name: str, value: float, **labels: str) -> None:
    """Observe (histogram), add (counter) or set (gauge) ``value`` for ``labels``."""
    getattr(metric(name), _RECORD[METRICS[name].kind])(value, tags=labels)


class RequestMetrics:
    """One request's figures at the ingress. ``model`` is "unknown" until the request names a model that
    exists (an unknown name never becomes a label value); :meth:`end` records the outcome once (later
    calls are ignored)."""

    def __init__(self, endpoint: str, generates: bool) -> None:
        self.endpoint, self.generates = endpoint, generates
        self.model = "unknown"
        self.started = time.perf_counter()
        self.replica_s: float | None = None
        self.ended = False

    def replica_time(self, seconds: float) -> None:
        """The replica's own seconds to its first records (its ReplicaTime record)."""
        self.replica_s = seconds

    def first_records(self) -> None:
        """The request's first records arrived from the model deployment."""
        spent = time.perf_counter() - self.started
        labels = {"model": self.model, "endpoint": self.endpoint}
        if self.generates:
            record("time_to_first_token_seconds", spent, **labels)
        if self.replica_s is not None:
            record("framework_time_to_first_token_seconds", max(0.0, spent - self.replica_s), **labels)

    def end(self, error: Any = None, *, cancelled: bool = False) -> None:
        """The answer ended: completely (no arguments), with ``error`` (a ServingError), or because the
        client went away (``cancelled``, or the error ``client_disconnected``)."""
        if self.ended:
            return
        self.ended = True
        labels = {"model": self.model, "endpoint": self.endpoint}
        code = getattr(error, "code", None) or getattr(error, "error_type", None)  # a 400 may have no code
        if cancelled or code == "client_disconnected":
            record("request_cancellations_total", 1, **labels)
            outcome = "cancelled"
        elif error is not None:
            record("request_errors_total", 1, code=str(code), **labels)
            if code == "overloaded":
                record("overload_rejections_total", 1, **labels)
            outcome = "error"
        else:
            record("e2e_request_latency_seconds", time.perf_counter() - self.started, **labels)
            outcome = "ok"
        record("requests_total", 1, outcome=outcome, **labels)
