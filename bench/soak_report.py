"""The soak's measurements and verdicts (bench/soak.py): server process memory, outcome counts, recovery
after each fault, and the report (markdown figures + a matplotlib plot).

Memory: :func:`rss_probe` lists every process under the given roots (the local Ray instance's driver, or
the local cluster's node processes) with a label from its title (``replica SmolLM2-135M-Instruct``,
``HAProxy``, ``raylet``...) and its RSS. A process's series starts when it is first seen with that label
(an idle Ray worker that becomes a replica starts a new one). It is judged after its warm-up (the run's,
or ``settle_s`` after the process appeared, whichever is later) against its baseline, the median of its
first three judged samples. Flat = no growth and no runaway peak: its settled level at the end (the
median of its last three samples) is at most ``tolerance`` above the baseline, and no sample is more
than ``2 x tolerance`` above it. A fall is not a leak (a process that served earlier traffic, e.g. the
session server's ingress after other tests' large bodies, returns memory to the OS), and a transient
peak that is given back is an allocator at work, not growth; judging every sample against
±``tolerance`` failed on both.
Idle workers (``IDLE``) are Ray's pool, started and ended on demand: listed, not judged.

Recovery after a fault: baseline = p99 latency of the ok requests that started in the ``baseline_s``
before it (after warm-up). Recovered at the first t >= fault time such that the requests started in
[t, t + window_s) all succeeded, their p99 is at most ``p99_tolerance`` x baseline, and one of them was
served by the faulted deployment (for a node loss: the deployment whose node was lost); the recovery
time is then the start of the first such request of the faulted deployment.

Failures (hangs, cuts, unclean answers) fail the run, except cuts of requests in flight at a node loss
(:data:`NODE_LOSS_GRACE_S`), which are reported apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.autoscale_load import windows
from bench.load import percentile
from bench.soak_traffic import FAILURES, Result

MB = 2**20
# A request in flight when a node is lost, cut within this many seconds of the loss, is not counted as a
# failure: its connection may have run through the lost node's HTTP proxy, and the process that held it
# is gone: no server can send it an error frame. Reported in its own line.
NODE_LOSS_GRACE_S = 5.0


@dataclass
class Fault:
    t: float  # time.time() when it was injected
    action: str  # "kill replica" | "lose node"
    target: str  # deployment or node name
    victim: str = ""  # actor name / node processes
    error: str = ""  # why it could not be injected


@dataclass
class Run:
    """What a soak measured; times are time.time()."""

    t0: float
    t_end: float
    warmup_until: float
    results: list[Result]
    faults: list[Fault]
    samples: list[tuple[float, dict[int, tuple[str, int]]]]
    stuck_clients: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


# --- memory ------------------------------------------------------------------------------------------
def label(cmdline: list[str]) -> str:
    """A short name for one server process from its command line / title."""
    title = " ".join(cmdline)
    if title.startswith("ray::"):
        # While an actor runs a method its title is ``ray::Class.method``: the process is the same.
        name = re.sub(r"\.[a-z_][A-Za-z0-9_]*$", "", title[5:].split(" ")[0])
        if "ServeReplica:" in name:  # also "SERVE_REPLICA::app#dep#id:ServeReplica:app:dep" while it starts
            return "replica " + name.split(":")[-1]
        return {"HAProxyManager": "HAProxyManager", "ProxyActor": "ProxyActor"}.get(name, name)
    exe = os.path.basename(cmdline[0]) if cmdline else "?"
    if exe.startswith("python"):
        script = next((a for a in cmdline[1:] if a.endswith(".py") or a.endswith("/ray")), "")
        module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline[:-1] else ""
        name = os.path.basename(script) or module or " ".join(cmdline)[:60]
        return "ray start (node)" if name == "ray" else name
    return exe


def rss_probe(roots: list[int], exclude: set[int]):
    """A probe for autoscale_load.Sampler: {pid: (label, rss bytes)} of every process under ``roots``."""

    def probe() -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        for root in roots:
            with contextlib.suppress(psutil.Error):
                r = psutil.Process(root)
                for p in [r, *r.children(recursive=True)]:
                    if p.pid in exclude:
                        continue
                    with contextlib.suppress(psutil.Error):
                        out[p.pid] = (label(p.cmdline()), p.memory_info().rss)
        return out
    return probe


def memory_series(run: Run) -> dict[tuple[int, str], list[tuple[float, int]]]:
    series: dict[tuple[int, str], list[tuple[float, int]]] = {}
    for t, procs in run.samples:
        for pid, (name, rss) in procs.items():
            series.setdefault((pid, name), []).append((t, rss))
    return series


def memory_verdicts(run: Run, tolerance: float, settle_s: float) -> list[dict[str, Any]]:
    rows = []
    last_sample = run.samples[-1][0] if run.samples else run.t_end
    for (pid, name), points in sorted(memory_series(run).items(), key=lambda kv: (kv[0][1], kv[1][0][0])):
        row = {"process": name, "pid": pid, "first_s": points[0][0] - run.t0,
               "ended_s": None if points[-1][0] >= last_sample else points[-1][0] - run.t0,
               "min_mb": min(r for _, r in points) / MB, "max_mb": max(r for _, r in points) / MB,
               "last_mb": points[-1][1] / MB, "baseline_mb": None, "growth": None, "peak": None, "flat": None}
        judged_from = max(run.warmup_until, points[0][0] + settle_s)
        judged = [r for t, r in points if t >= judged_from]
        if name != "IDLE" and len(judged) >= 3:
            base = float(np.median(judged[:3]))
            row["baseline_mb"] = base / MB
            row["growth"] = float(np.median(judged[-3:])) / base - 1
            row["peak"] = max(judged) / base - 1
            row["flat"] = row["growth"] <= tolerance and row["peak"] <= 2 * tolerance
        rows.append(row)
    return rows


# --- latency and outcomes ----------------------------------------------------------------------------
def recovery(run: Run, fault: Fault, baseline_s: float, window_s: float, tolerance: float,
             horizon_s: float = 300) -> dict[str, Any]:
    since = max(run.warmup_until, fault.t - baseline_s)
    earlier = [f.t for f in run.faults if f.t < fault.t]
    since = max([since] + [t + 60 for t in earlier])  # not the previous fault's recovery
    base = percentile([r.end - r.start for r in run.results if since <= r.start and r.end <= fault.t
                       and r.outcome == "ok"], 99)
    failed = [r for r in run.results if r.outcome != "ok" and r.end >= fault.t and r.start < fault.t + 60]
    hit = [r for r in run.results if r.start >= fault.t and r.outcome == "ok" and r.deployment == fault.target]
    out = {"baseline_p99": base, "recovered_s": None, "errors_after": len(failed),
           "errors_by_outcome": outcome_counts(failed).get("all", {}),
           "first_ok_s": min((r.start for r in hit), default=None)}
    if out["first_ok_s"] is not None:
        out["first_ok_s"] -= fault.t
    if base is None:
        return out
    for t in np.arange(fault.t, min(fault.t + horizon_s, run.t_end - window_s), 1.0):
        inside = [r for r in run.results if t <= r.start < t + window_s]
        if not inside or any(r.outcome != "ok" for r in inside):
            continue
        # The faulted deployment's first request of the window: service is back from there.
        back = min((r.start for r in inside if r.deployment == fault.target), default=None)
        if back is None:
            continue
        p99 = percentile([r.end - r.start for r in inside], 99)
        if p99 <= tolerance * base:
            out.update(recovered_s=float(max(t, back) - fault.t), window_p99=p99)
            break
    return out


def outcome_counts(results: list[Result]) -> dict[str, dict[str, int]]:
    """{kind: {outcome label: count}}, plus an ``all`` row."""
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        for key in (r.kind, "all"):
            row = counts.setdefault(key, {})
            row[r.label] = row.get(r.label, 0) + 1
    return counts


def analyse(run: Run, *, rss_tolerance: float = 0.10, settle_s: float = 60, baseline_s: float = 60,
            window_s: float = 10, p99_tolerance: float = 1.5, recovery_limit_s: float = 30) -> dict[str, Any]:
    """Every figure of the report and the verdicts (``passed``: all of them hold)."""
    lost = [f.t for f in run.faults if f.action == "lose node" and not f.error]
    at_loss = [r for r in run.results if r.outcome == "cut"
               and any(r.start <= t <= r.end <= t + NODE_LOSS_GRACE_S for t in lost)]
    failures = [r for r in run.results if r.outcome in FAILURES and r not in at_loss]
    memory = memory_verdicts(run, rss_tolerance, settle_s)
    faults = [{**asdict(f), "t_s": f.t - run.t0, **recovery(run, f, baseline_s, window_s, p99_tolerance)}
              for f in run.faults]
    latency = {}
    for kind in sorted({r.kind for r in run.results}):
        lat = [r.end - r.start for r in run.results if r.kind == kind and r.outcome == "ok"]
        latency[kind] = {"ok": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99)}
    checks = {
        "no request hung, was cut or answered uncleanly": not failures and not run.stuck_clients,
        f"RSS of every server process flat after warm-up (growth ≤ {rss_tolerance:.0%}, "
        f"peak ≤ {2 * rss_tolerance:.0%})":
            all(m["flat"] is not False for m in memory) and any(m["flat"] for m in memory),
        f"p99 back to baseline (≤ {p99_tolerance:g}x) within {recovery_limit_s:g} s of each fault":
            all(f["recovered_s"] is not None and f["recovered_s"] <= recovery_limit_s for f in faults
                if not f["error"]),
        "every planned fault was injected": all(not f["error"] for f in faults),
    }
    return {"counts": outcome_counts(run.results), "failures": [asdict(r) for r in failures[:20]],
            "cut_at_node_loss": len(at_loss),
            "stuck_clients": run.stuck_clients, "memory": memory, "faults": faults, "latency": latency,
            "windows": windows(run.results, run.t0, run.t_end, window_s), "checks": checks,
            "passed": all(checks.values()),
            "limits": {"rss_tolerance": rss_tolerance, "settle_s": settle_s, "baseline_s": baseline_s,
                       "window_s": window_s, "p99_tolerance": p99_tolerance,
                       "recovery_limit_s": recovery_limit_s}}


# --- report ------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown(run: Run, a: dict[str, Any]) -> str:
    m = run.meta
    lines = [f"# Soak with faults ({m.get('mode', '?')})", "",
             f"`{m.get('command', '')}` — {(run.t_end - run.t0) / 60:.1f} min of {m.get('clients')} closed-loop "
             f"clients, warm-up {run.warmup_until - run.t0:.0f} s; {m.get('machine', '')}. Server: "
             f"{m.get('server', '')}.", "", "## Verdicts", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in a["checks"].items()]
    if a["cut_at_node_loss"]:
        lines.append(f"- not counted above: {a['cut_at_node_loss']} request(s) in flight at a node loss, cut within "
                     f"{NODE_LOSS_GRACE_S:g} s of it (a connection through the lost node's proxy cannot get an "
                     "error frame: the process that held it is gone)")
    if a["stuck_clients"]:
        lines.append(f"- {a['stuck_clients']} client(s) still inside a request after the stop")
    lines += ["", "## Outcomes", "", "Per kind of request: `http S code` = a clean OpenAI error status; "
              "`stream_error code` = an error event, then `[DONE]`; `refused` = connection not opened; "
              "`timeout`, `cut`, `unclean` are failures.", ""]
    labels = sorted({lab for row in a["counts"].values() for lab in row}, key=lambda s: (s != "ok", s))
    lines += ["| kind | " + " | ".join(labels) + " | ok p50 (s) | ok p99 (s) |",
              "|---|" + "---:|" * (len(labels) + 2)]
    for kind, row in sorted(a["counts"].items(), key=lambda kv: (kv[0] == "all", kv[0])):
        lat = a["latency"].get(kind, {})
        lines.append(f"| {kind} | " + " | ".join(str(row.get(lab, 0)) for lab in labels)
                     + f" | {_f(lat.get('p50'))} | {_f(lat.get('p99'))} |")
    for f in a["failures"][:5]:
        lines.append(f"\n- failure: {f['kind']} at {f['start'] - run.t0:.0f} s: {f['outcome']} {f['detail']}")
    lim = a["limits"]
    lines += ["", "## Faults", "", f"Baseline: p99 of the ok requests in the {lim['baseline_s']:g} s before the "
              f"fault; recovered when the requests started in a {lim['window_s']:g} s window all succeed, "
              f"include the faulted deployment and have p99 ≤ {lim['p99_tolerance']:g}x baseline. First ok: "
              "when the first request that the faulted deployment then answered was sent (the outage a client "
              "sees). Errors: non-ok requests that ended after the fault and started within 60 s of it.", "",
              "| at (s) | fault | target | victim | first ok after (s) | baseline p99 (s) | recovered after (s) "
              "| errors |", "|---:|---|---|---|---:|---:|---:|---|"]
    for f in a["faults"]:
        target = f["target"] if f["action"] == "kill replica" else f"the node of {f['target']}"
        lines.append(f"| {f['t_s']:.0f} | {f['action']} | {target} | {f['error'] or f['victim']} | "
                     f"{_f(f['first_ok_s'], '.0f')} | {_f(f['baseline_p99'])} | {_f(f['recovered_s'], '.0f')} | "
                     + (", ".join(f"{n} {lab}" for lab, n in sorted(f["errors_by_outcome"].items())) or "0") + " |")
    lines += ["", "## Memory (RSS)", "", f"Each server process (time of first sample; ended = its last sample, a "
              f"killed replica or lost node); judged after warm-up and {lim['settle_s']:g} s after it appeared, "
              f"against the median of its first three judged samples: growth = the median of its last three "
              f"over it, peak = its highest judged sample over it; flat = growth ≤ {lim['rss_tolerance']:.0%} "
              f"and peak ≤ {2 * lim['rss_tolerance']:.0%}.", "",
              "| process | pid | seen at (s) | ended (s) | baseline MB | min MB | max MB | last MB | growth | peak "
              "| flat |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in a["memory"]:
        flat = {True: "yes", False: "**NO**", None: "not judged"}[r["flat"]]
        lines.append(f"| {r['process']} | {r['pid']} | {r['first_s']:.0f} | {_f(r['ended_s'], '.0f')} | "
                     f"{_f(r['baseline_mb'], '.0f')} | {r['min_mb']:.0f} | {r['max_mb']:.0f} | "
                     f"{r['last_mb']:.0f} | {_f(r['growth'], '+.1%')} | {_f(r['peak'], '+.1%')} | {flat} |")
    lines += ["", "## Over time (per minute)", "", "Requests that ended in each minute (those that ended after the "
              "run, while its clients stopped, are only in the outcome counts).", "",
              "| minute | ok/s | errors | ok p50 (s) | ok p99 (s) |",
              "|---:|---:|---:|---:|---:|"]
    for i in range(int(np.ceil((run.t_end - run.t0 - 1) / 60))):  # a last minute of under 1 s: none
        a_, b_ = run.t0 + 60 * i, min(run.t0 + 60 * (i + 1), run.t_end)
        inside = [r for r in run.results if a_ <= r.end < b_]
        lat = [r.end - r.start for r in inside if r.outcome == "ok"]
        lines.append(f"| {i} | {len(lat) / (b_ - a_):.2f} | {len(inside) - len(lat)} | "
                     f"{_f(percentile(lat, 50))} | {_f(percentile(lat, 99))} |")
    return "\n".join(lines) + "\n"


def plot(run: Run, a: dict[str, Any], path: Path) -> bool:
    """Throughput, p50/p99 latency and RSS per process over time, faults as vertical lines; False if
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    win, step = a["windows"], a["limits"]["window_s"]
    t = [w["t"] / 60 for w in win]
    ax1.plot(t, [w["ok"] / step for w in win], label="ok requests/s")
    ax1.plot(t, [w["rate"] - w["ok"] / step for w in win], label="other outcomes/s", color="tab:red")
    ax2.plot(t, [w["p50"] for w in win], label="p50")
    ax2.plot(t, [w["p99"] for w in win], label="p99")
    ax2.set_yscale("log")
    ax3.set_yscale("log")  # a 3 GB chat replica beside a 13 MB HAProxy
    for (pid, name), points in memory_series(run).items():
        if name != "IDLE" and len(points) > 1:
            ax3.plot([(x - run.t0) / 60 for x, _ in points], [r / MB for _, r in points], label=f"{name} {pid}")
    for ax, title in ((ax1, "throughput (per %g s window)" % step), (ax2, "latency of ok requests (s)"),
                      (ax3, "RSS (MB) per server process")):
        for f in a["faults"]:
            ax.axvline(f["t_s"] / 60, color="black", linestyle="--", linewidth=0.8)
        ax.axvline((run.warmup_until - run.t0) / 60, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(title, fontsize=10)
    for f in a["faults"]:
        ax1.annotate(f"{f['action']}: {f['target']}", (f["t_s"] / 60, ax1.get_ylim()[1]), fontsize=7,
                     rotation=90, va="top", ha="right")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    ax3.set_xlabel("minutes since start (dotted: end of warm-up; dashed: faults)")
    ax3.legend(fontsize=6, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write(run: Run, a: dict[str, Any], out: Path) -> list[Path]:
    """``out``.md, .json (figures, not every request) and .png (if matplotlib is installed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".md"), out.with_suffix(".json")]
    paths[0].write_text(markdown(run, a))
    series = {f"{name} {pid}": [[round(t - run.t0, 1), round(rss / MB, 1)] for t, rss in points]
              for (pid, name), points in memory_series(run).items()}
    paths[1].write_text(json.dumps({"meta": run.meta, **a, "rss_mb": series}, indent=1, default=str))
    if plot(run, a, out.with_suffix(".png")):
        paths.append(out.with_suffix(".png"))
    return paths
