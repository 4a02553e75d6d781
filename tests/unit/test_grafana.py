"""The Grafana dashboard (cluster/grafana.py -> cluster/grafana-dashboard.json): the committed file is
what the module builds, it is a well-formed dashboard, and its queries use our metrics as their kinds
allow. That Ray Serve's metrics it names exist is checked against a real scrape
(tests/integration/test_metrics_api.py)."""

from __future__ import annotations

import json
import re

from app.metrics import METRICS, exported_name
from cluster.grafana import OUT, dashboard, dashboard_metrics, render

OURS = {exported_name(name): spec for name, spec in METRICS.items()}


def test_the_committed_dashboard_is_the_built_one():
    assert json.loads(OUT.read_text()) == dashboard()
    assert OUT.read_text() == render()


def test_panels_are_well_formed_and_do_not_overlap():
    board = json.loads(OUT.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, panel["title"]
        cells |= mine
        if panel["type"] == "timeseries":
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(set(refs)) == len(refs) and all(t["expr"] for t in panel["targets"])
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "application", "model"}


def base(name: str) -> str:
    return re.sub(r"_(bucket|count|sum)$", "", name)


def test_queries_use_our_metrics_by_their_kind():
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for expr in exprs:
        for name in re.findall(r"\b(ray_serve_transformers_[a-z0-9_]+)", expr):
            spec = OURS.get(base(name)) or OURS.get(name)
            assert spec is not None, f"{name} is not a metric of app/metrics.py"
            if name.endswith("_bucket"):
                assert spec.kind == "histogram" and "histogram_quantile" in expr, expr
            elif spec.kind == "counter":
                assert re.search(rf"(rate|increase)\({name}\b", expr), f"a counter is read through rate(): {expr}"
            else:
                assert spec.kind == "gauge", f"{name}: a histogram is read through its buckets"
    # Every metric of ours that an operator needs is on the dashboard.
    shown = {base(m) for m in dashboard_metrics()}
    assert set(OURS) <= shown, set(OURS) - shown
