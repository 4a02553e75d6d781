"""Scraping Ray's Prometheus endpoint during a bench run, and the dashboard's PromQL done by hand.

:class:`Scraper` reads the endpoint every ``every_s`` on a thread and keeps, per scrape, the cumulative
value of each series of ours (``ray_serve_transformers_*``) and of the Ray Serve metrics asked for,
summed over the labels Ray adds per process (replica, worker, node...), keyed by the labels that matter
(``model``, ``endpoint``, ``outcome``, ``deployment``, ``le``). The functions below compute what
cluster/grafana.py's queries show: ``rate()`` of a counter between two scrapes, ``histogram_quantile()``
from the bucket increases between two scrapes (Prometheus' linear interpolation inside the bucket),
the mean of a histogram (``_sum`` / ``_count`` increases) and gauge values.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import METRICS, PREFIX

OURS = "ray_" + PREFIX
KEEP = ("model", "endpoint", "outcome", "deployment", "le")


def series_key(name: str, labels: dict[str, str], keep: tuple[str, ...] = KEEP) -> str:
    """``name{k=v,...}`` with the kept labels, sorted (a stable JSON key)."""
    kept = ",".join(f"{k}={labels[k]}" for k in sorted(labels) if k in keep)
    return f"{name}{{{kept}}}"


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    labels = dict(pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
    return name, labels


def scrape_once(url: str, names: tuple[str, ...], keep: tuple[str, ...] = KEEP) -> dict[str, float]:
    """One scrape: {series key: value} of the metric families whose name starts with one of ``names``
    (lines of other families are dropped before parsing: Ray's page is large, the machine small), summed
    over every label but ``keep``."""
    text = requests.get(url, timeout=10).text
    wanted = []
    for line in text.splitlines():
        body = line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line
        if body.startswith(names):
            wanted.append(line)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(wanted) + "\n"):
        for sample in family.samples:
            key = series_key(sample.name, sample.labels, keep)
            out[key] = out.get(key, 0.0) + sample.value
    return out


class Scraper:
    """Scrapes ``url`` every ``every_s`` seconds on a daemon thread; ``times`` (time.time()) and
    ``samples`` (one dict per scrape) grow as it runs."""

    def __init__(self, url: str, names: tuple[str, ...] = (OURS, "ray_serve_"), every_s: float = 2.0) -> None:
        self.url, self.names, self.every_s = url, names, every_s
        self.times: list[float] = []
        self.samples: list[dict[str, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def scrape(self) -> None:
        t = time.time()
        try:
            sample = scrape_once(self.url, self.names)
        except Exception:  # noqa: BLE001 - a missed scrape is a gap, not a failure
            self.errors += 1
            return
        self.times.append(t)
        self.samples.append(sample)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            self.scrape()
            self._stop.wait(max(0.0, self.every_s - (time.time() - started)))

    def start(self) -> "Scraper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# --- the PromQL by hand ---------------------------------------------------------------------------
def total(sample: dict[str, float], name: str, **labels: str) -> float:
    """``sum(name{labels})`` of one scrape."""
    want = set(labels.items())
    return sum(v for k, v in sample.items() if k.startswith(name + "{") and want <= set(parse_key(k)[1].items()))


def buckets(sample: dict[str, float], name: str, **labels: str) -> dict[float, float]:
    """``sum by (le) (name_bucket{labels})`` of one scrape: {upper bound: cumulative count}."""
    want = set(labels.items())
    out: dict[float, float] = {}
    for key, v in sample.items():
        n, ls = parse_key(key)
        if n == name + "_bucket" and want <= set(ls.items()):
            le = float(ls["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(q: float, counts: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``counts`` {le: cumulative count} (increases over a window);
    linear interpolation inside the bucket that holds rank q * count; the highest finite bound if that
    bucket is +Inf; None without observations."""
    bounds = sorted(counts)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    cum, running = [], 0.0
    for b in bounds:  # monotone, as Prometheus enforces
        running = max(running, counts[b])
        cum.append(running)
    n = cum[-1]
    if n <= 0:
        return None
    rank = q * n
    i = next(i for i, c in enumerate(cum) if c >= rank)
    if math.isinf(bounds[i]):
        return bounds[-2] if len(bounds) > 1 else None
    lower, below = (0.0, 0.0) if i == 0 else (bounds[i - 1], cum[i - 1])
    if i == 0 and bounds[0] <= 0:
        return bounds[0]
    return lower + (bounds[i] - lower) * (rank - below) / (cum[i] - below) if cum[i] > below else bounds[i]


def increase_buckets(a: dict[str, float], b: dict[str, float], name: str, **labels: str) -> dict[float, float]:
    after, before = buckets(b, name, **labels), buckets(a, name, **labels)
    return {le: max(0.0, v - before.get(le, 0.0)) for le, v in after.items()}


def quantile_between(a: dict[str, float], b: dict[str, float], q: float, name: str, **labels: str) -> float | None:
    """``histogram_quantile(q, sum by (le) (increase(name_bucket{labels}[a..b])))``."""
    return histogram_quantile(q, increase_buckets(a, b, name, **labels))


def mean_between(a: dict[str, float], b: dict[str, float], name: str, **labels: str) -> float | None:
    """Mean observation between two scrapes: increase of ``_sum`` / increase of ``_count``."""
    count = total(b, name + "_count", **labels) - total(a, name + "_count", **labels)
    return (total(b, name + "_sum", **labels) - total(a, name + "_sum", **labels)) / count if count > 0 else None


def windows(times: list[float], window_s: float) -> list[tuple[int, int]]:
    """(i, j) scrape index pairs: for each scrape j, i is the latest scrape at least ``window_s`` before
    it (Grafana's ``rate(...[window])`` evaluated at every scrape)."""
    out, i = [], 0
    for j, t in enumerate(times):
        while i + 1 < j and times[i + 1] <= t - window_s:
            i += 1
        if j > i and t - times[i] >= window_s * 0.9:
            out.append((i, j))
    return out


# --- the saved samples ------------------------------------------------------------------------------
def _bucket_group(key: str) -> tuple[str, str] | None:
    name, labels = parse_key(key)
    if not name.endswith("_bucket"):
        return None
    return name, ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "le")


def compact(times: list[float], samples: list[dict[str, float]], keep: set[str], t0: float) -> dict[str, Any]:
    """The samples of metrics ``keep`` (base names) as {"t": [...], "series": {key: [values]}}, small:
    bucket series left out where :func:`expand` rebuilds them (leading buckets that stay 0; trailing
    ones that always equal the +Inf bucket), values rounded."""
    keys = sorted({k for s in samples for k in s
                   if any(parse_key(k)[0] in (m, m + "_bucket", m + "_sum", m + "_count") for m in keep)})
    series = {k: [round(s.get(k, 0.0), 6) for s in samples] for k in keys}
    groups: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for k in keys:
        if (g := _bucket_group(k)) is not None:
            groups.setdefault(g, []).append((float(parse_key(k)[1]["le"]), k))
    for members in groups.values():
        members.sort()
        inf = series[members[-1][1]]
        for _, k in members[:-1]:  # leading zeros
            if any(series[k]):
                break
            del series[k]
        for _, k in reversed(members[:-1]):  # trailing copies of +Inf
            if k not in series or series[k] != inf:
                break
            del series[k]
    return {"t": [round(t - t0, 2) for t in times], "series": series}


def expand(saved: dict[str, Any], t0: float) -> tuple[list[float], list[dict[str, float]]]:
    """Inverse of :func:`compact`: the times and per-scrape samples, the left-out buckets rebuilt from the
    bucket bounds of app/metrics.py."""
    times = [t0 + t for t in saved["t"]]
    series = dict(saved["series"])
    groups: dict[tuple[str, str], dict[float, str]] = {}
    for k in list(series):
        if (g := _bucket_group(k)) is not None:
            groups.setdefault(g, {})[float(parse_key(k)[1]["le"])] = k
    for (name, rest), present in groups.items():
        spec = METRICS.get(name[len(OURS):-len("_bucket")])
        if spec is None:
            continue
        inf = series[present[math.inf]]
        lowest = min(present)
        for b in spec.buckets:
            if b not in present:
                le = {"le": repr(float(b))}
                labels = dict(pair.split("=", 1) for pair in rest.split(",") if pair) | le
                key = series_key(name, labels)
                series[key] = [0.0] * len(times) if b < lowest else list(inf)
    samples = [{k: v[i] for k, v in series.items()} for i in range(len(times))]
    return times, samples
