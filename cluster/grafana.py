"""The Grafana dashboard of this server, built from one table of panels (:data:`PANELS`).

``python -m cluster.grafana`` writes ``cluster/grafana-dashboard.json`` (import it in Grafana: Dashboards ->
New -> Import, and pick the Prometheus data source that scrapes Ray's metrics ports). Its queries use this
server's metrics (``app/metrics.py``, exported as ``ray_serve_transformers_*``) and Ray Serve's own
(``ray_serve_*``); ``tests/unit/test_grafana.py`` checks that the committed file is what this module
builds and that every query names a metric one of them exports. Variables: the Prometheus data source,
the application and the models.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).with_name("grafana-dashboard.json")
P = "ray_serve_transformers_"
SEL = 'model=~"$model"'  # our metrics' selector
SERVE_SEL = 'application=~"$application"'  # Ray Serve's


def quantiles(metric: str, by: str = "model", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """``histogram_quantile`` queries of ``metric`` (a histogram) at each of ``qs``, per ``by``."""
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))",
             f"p{int(q * 100)} {{{{{by}}}}}") for q in qs]


@dataclass(frozen=True)
class Panel:
    """One time series panel: ``targets`` are (PromQL, legend) pairs; ``unit`` is Grafana's."""

    title: str
    unit: str
    targets: list[tuple[str, str]]
    description: str = ""


ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic", [
        Panel("Requests/s by endpoint and outcome", "reqps", [
            (f"sum by (model, endpoint, outcome) (rate({P}requests_total{{{SEL}}}[$__rate_interval]))",
             "{{model}} {{endpoint}} {{outcome}}")]),
        Panel("Errors/s by code", "reqps", [
            (f"sum by (model, code) (rate({P}request_errors_total{{{SEL}}}[$__rate_interval]))", "{{model}} {{code}}"),
            (f"sum by (model) (rate({P}overload_rejections_total{{{SEL}}}[$__rate_interval]))",
             "{{model}} overloaded (503)"),
            (f"sum by (model) (rate({P}request_cancellations_total{{{SEL}}}[$__rate_interval]))",
             "{{model}} cancelled by the client")]),
        Panel("Tokens/s", "short", [
            (f"sum by (model) (rate({P}generation_tokens_total{{{SEL}}}[$__rate_interval]))", "{{model}} generated"),
            (f"sum by (model) (rate({P}prompt_tokens_total{{{SEL}}}[$__rate_interval]))", "{{model}} prompt")]),
        Panel("Audio seconds transcribed per second", "short", [
            (f"sum by (model) (rate({P}audio_seconds_total{{{SEL}}}[$__rate_interval]))", "{{model}}")]),
    ]),
    ("Latency", [
        Panel("Time to first token (at the ingress)", "s", quantiles(f"{P}time_to_first_token_seconds")),
        Panel("TTFT p50: framework vs engine", "s", [
            *quantiles(f"{P}framework_time_to_first_token_seconds", qs=(0.5,)),
            *quantiles(f"{P}engine_time_to_first_token_seconds", qs=(0.5,)),
            *quantiles(f"{P}replica_time_to_first_records_seconds", qs=(0.5,))],
            "Framework: the ingress and Ray's path (ingress TTFT minus the replica's own time). Engine: "
            "submitted to the engine to first token. Replica: the call's arrival at the model replica to "
            "its first records (adds the chat template and tokenization)."),
        Panel("Inter-token latency", "s", quantiles(f"{P}inter_token_latency_seconds")),
        Panel("End-to-end latency", "s", quantiles(f"{P}e2e_request_latency_seconds")),
        Panel("Queue and prefill time (p95)", "s", [
            *[(q, "queue " + legend) for q, legend in quantiles(f"{P}request_queue_time_seconds", qs=(0.95,))],
            *[(q, "prefill " + legend) for q, legend in quantiles(f"{P}request_prefill_time_seconds", qs=(0.95,))]]),
        Panel("Tokens per request (p50)", "short", [
            *[(q, "prompt " + legend) for q, legend in quantiles(f"{P}request_prompt_tokens", qs=(0.5,))],
            *[(q, "generated " + legend) for q, legend in quantiles(f"{P}request_generation_tokens", qs=(0.5,))]]),
    ]),
    ("Engines and replicas", [
        Panel("Batch fill (running rows / max_running_rows)", "percentunit", [
            (f"sum by (model) ({P}num_running_rows{{{SEL}}}) / sum by (model) ({P}max_running_rows{{{SEL}}})",
             "{{model}}")]),
        Panel("Waiting for the engine", "short", [
            (f"sum by (model) ({P}num_waiting_requests{{{SEL}}})", "{{model}} requests"),
            (f"sum by (model) ({P}num_waiting_prefill_tokens{{{SEL}}})", "{{model}} prompt tokens")]),
        Panel("Finished choices/s by finish reason", "reqps", [
            (f"sum by (model, finish_reason) (rate({P}request_success_total{{{SEL}}}[$__rate_interval]))",
             "{{model}} {{finish_reason}}")]),
        Panel("Healthy replicas per deployment (Ray Serve)", "short", [
            (f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{SERVE_SEL}}})", "{{deployment}}")]),
        Panel("Ongoing requests per deployment (Ray Serve)", "short", [
            (f"sum by (deployment) (ray_serve_replica_processing_queries{{{SERVE_SEL}}})", "{{deployment}}")]),
        Panel("Processing latency p95 per deployment (Ray Serve)", "ms", [
            ("histogram_quantile(0.95, sum by (le, deployment) (rate(ray_serve_deployment_processing_latency_ms_bucket"
             f"{{{SERVE_SEL}}}[$__rate_interval])))", "{{deployment}}")]),
        Panel("On-demand models: loads, evictions, failures", "short", [
            (f"sum by (model) (increase({P}model_loads_total{{{SEL}}}[$__range]))", "{{model}} loads"),
            (f"sum by (model) (increase({P}model_evictions_total{{{SEL}}}[$__range]))", "{{model}} evictions"),
            (f"sum by (model) (increase({P}model_load_failures_total{{{SEL}}}[$__range]))", "{{model}} failures")]),
        Panel("On-demand load seconds (p50, p95)", "s", quantiles(f"{P}model_load_seconds", qs=(0.5, 0.95))),
    ]),
]


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": {"lineWidth": 1, "fillOpacity": 10}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr,
                     "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(panel.targets)],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "multi": True,
            "current": {"selected": True, "text": "All", "value": "$__all"}, "allValue": ".*", "refresh": 2,
            "sort": 1}


def dashboard() -> dict:
    """The dashboard as Grafana's JSON model (schemaVersion 39: Grafana 10 and 11)."""
    panels: list[dict] = []
    y, panel_id = 0, 1
    for title, row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        for i, panel in enumerate(row):
            panels.append(_panel(panel, panel_id, 12 * (i % 2), y + 8 * (i // 2)))
            panel_id += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "serve-transformers", "title": "serve-transformers", "tags": ["ray-serve", "llm"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1, "links": [], "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("application", "Application", "label_values(ray_serve_deployment_replica_healthy, application)"),
            _variable("model", "Model", f"label_values({P}requests_total, model)"),
        ]},
        "panels": panels,
    }


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries and variables name."""
    text = json.dumps(dashboard())
    return set(re.findall(r"\b(ray_[a-z0-9_]+)", text))


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.read_text() == render() else "cluster/grafana-dashboard.json is stale: run python -m cluster.grafana")
    OUT.write_text(render())
    print(f"wrote {OUT}")
