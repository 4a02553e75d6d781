"""What the Grafana dashboard shows during a bench run, computed from Ray's metrics endpoint:

    python -m bench.metrics_run            # ~7 min on a 2-core machine

Starts our server in this process (``app.local.serve_locally``, a private Ray with its Prometheus exporter
on a free port, metrics reported every second) on SmolLM2-135M-Instruct with bench/smollm2.yaml's model
settings, then runs phases of closed-loop streaming chat clients (bench/load.py): each level (1, 8, 32
clients) with the short prompts, then the mixed (prefill-heavy) ones, for about ``--phase-seconds`` each,
with an idle gap between phases. A thread scrapes the endpoint every 2 s (bench/metrics_scrape.py).
From the scrapes it computes cluster/grafana.py's panels over time (rates and histogram quantiles over
``--window-seconds`` windows) and a table per phase (whole-phase increases), compared with what the
clients measured. Writes bench/results/metrics.json (the scrapes of the plotted series, the phases and the
table), metrics.png and metrics.md. ``--from-json`` redraws all three from a saved run's metrics.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import metrics_scrape as ms
from bench.config import RESULTS_DIR, load_config
from bench.load import HttpDriver, summarize
from bench.prompts import make_prompts

O = ms.OURS
CHAT = "/v1/chat/completions"
PLOTTED = {O + n for n in (
    "requests_total", "generation_tokens_total", "prompt_tokens_total", "time_to_first_token_seconds",
    "framework_time_to_first_token_seconds", "engine_time_to_first_token_seconds",
    "replica_time_to_first_records_seconds", "inter_token_latency_seconds", "request_queue_time_seconds",
    "request_prefill_time_seconds", "num_running_rows", "max_running_rows", "num_waiting_requests")} | {
    "ray_serve_replica_processing_queries"}
SCRAPED = (O, "ray_serve_replica_processing_queries")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, run the phases while scraping, stop everything; the raw run."""
    import ray
    from ray import serve

    from app.local import free_port, serve_locally

    config = load_config(args.config)
    ours = config.ours
    model_args = {"models": [{"id": ours.model_id, "source": config.model, "task": "chat",
                              "batching": ours.batching.model_dump(), "prefill_threads": ours.prefill_threads,
                              "decode_threads": ours.decode_threads,
                              "limits": {"default_max_tokens": config.max_tokens, "max_tokens": 4096}}]}
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # before Ray starts: its processes read it
    os.environ.update(ours.env)  # RAY_worker_niceness=0, as bench/run.py gives its server
    metrics_port = free_port()
    started = time.time()
    base = serve_locally(model_args, num_cpus=ours.ray_num_cpus, env=ours.env, timeout_s=600,
                         metrics_port=metrics_port)
    print(f"server up after {time.time() - started:.0f} s; metrics on :{metrics_port}", flush=True)
    scraper = ms.Scraper(f"http://127.0.0.1:{metrics_port}/metrics", SCRAPED, args.scrape_every)
    phases: list[dict[str, Any]] = []
    try:
        driver = HttpDriver(base, ours.model_id)
        prompt_sets = {m: make_prompts(args.prompts_per_phase, config.mixes[m]) for m in args.mixes}
        asyncio.run(driver.warmup(prompt_sets[args.mixes[0]][-config.warmup_requests:], args.max_tokens))
        scraper.start()
        time.sleep(args.gap_seconds)
        for level in args.levels:
            for mix in args.mixes:
                start = time.time()
                records, wall = asyncio.run(driver.measure(prompt_sets[mix], level, args.max_tokens,
                                                           args.phase_seconds))
                stats = summarize(records, level, len(prompt_sets[mix]), wall)
                phases.append({"clients": level, "mix": mix, "start": start, "end": start + wall,
                               "client": stats.to_dict()})
                print(f"phase {len(phases)}: {level} clients {mix}: {stats.requests} requests in {wall:.0f} s, "
                      f"{stats.tokens_per_s:.0f} tok/s, TTFT p50 {stats.ttft_p50 or 0:.3f} s, "
                      f"errors {stats.errors}", flush=True)
                time.sleep(args.gap_seconds)
    finally:
        scraper.stop()
        serve.shutdown()
        ray.shutdown()
    t0 = phases[0]["start"] - args.gap_seconds if phases else started
    return {"command": args.command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": time.time() - started, "model": config.model, "model_id": ours.model_id,
            "max_tokens": args.max_tokens, "window_s": args.window_seconds, "scrape_every_s": args.scrape_every,
            "scrape_errors": scraper.errors, "t0": t0, "code": _code_version(),
            "phases": [{**p, "start": p["start"] - t0, "end": p["end"] - t0} for p in phases],
            "scrapes": ms.compact(scraper.times, scraper.samples, PLOTTED, t0)}


def _code_version() -> str:
    from bench.run import _code_version as version

    return version()


# --- the dashboard's figures ----------------------------------------------------------------------
def _fig(a: dict[str, float], b: dict[str, float], dt: float, model: str) -> dict[str, float | None]:
    """The panels' values between scrapes ``a`` and ``b`` (``dt`` seconds apart)."""
    m, ing = {"model": model}, {"model": model, "endpoint": CHAT}

    def rate(name: str, **labels: str) -> float:
        return (ms.total(b, O + name, **labels) - ms.total(a, O + name, **labels)) / dt

    def q(p: float, name: str, labels: dict[str, str]) -> float | None:
        return ms.quantile_between(a, b, p, O + name, **labels)

    return {
        "req_s": rate("requests_total", **ing), "ok_s": rate("requests_total", outcome="ok", **ing),
        "gen_tok_s": rate("generation_tokens_total", **m), "prompt_tok_s": rate("prompt_tokens_total", **m),
        "ttft_p50": q(0.5, "time_to_first_token_seconds", ing), "ttft_p95": q(0.95, "time_to_first_token_seconds", ing),
        "fw_p50": q(0.5, "framework_time_to_first_token_seconds", ing),
        "engine_p50": q(0.5, "engine_time_to_first_token_seconds", m),
        "replica_p50": q(0.5, "replica_time_to_first_records_seconds", m),
        "itl_p50": q(0.5, "inter_token_latency_seconds", m), "itl_p95": q(0.95, "inter_token_latency_seconds", m),
        "queue_p95": q(0.95, "request_queue_time_seconds", m), "prefill_p95": q(0.95, "request_prefill_time_seconds", m),
        "ttft_mean": ms.mean_between(a, b, O + "time_to_first_token_seconds", **ing),
        "fw_mean": ms.mean_between(a, b, O + "framework_time_to_first_token_seconds", **ing),
        "engine_mean": ms.mean_between(a, b, O + "engine_time_to_first_token_seconds", **m),
        "ttft_count": ms.total(b, O + "time_to_first_token_seconds_count", **ing)
        - ms.total(a, O + "time_to_first_token_seconds_count", **ing),
    }


def _gauges(s: dict[str, float], model: str) -> dict[str, float | None]:
    cap = ms.total(s, O + "max_running_rows", model=model)
    return {"fill": ms.total(s, O + "num_running_rows", model=model) / cap if cap else None,
            "waiting": ms.total(s, O + "num_waiting_requests", model=model),
            "ongoing_model": ms.total(s, "ray_serve_replica_processing_queries", deployment=model),
            "ongoing_ingress": ms.total(s, "ray_serve_replica_processing_queries", deployment="OpenAIIngress")}


def analyse(saved: dict[str, Any]) -> dict[str, Any]:
    """Panels over time (``series``: lists aligned with ``t``) and the per-phase table (``table``)."""
    t0, model = saved["t0"], saved["model_id"]
    times, samples = ms.expand(saved["scrapes"], t0)
    series: dict[str, list] = {"t": []}
    for i, j in ms.windows(times, saved["window_s"]):
        row = {**_fig(samples[i], samples[j], times[j] - times[i], model), **_gauges(samples[j], model)}
        series["t"].append(times[j] - t0)
        for k, v in row.items():
            series.setdefault(k, []).append(v)
    table, phases = [], saved["phases"]
    for n, p in enumerate(phases):
        start, end = t0 + p["start"], t0 + p["end"]
        until = t0 + phases[n + 1]["start"] if n + 1 < len(phases) else times[-1] + 1
        a = max((i for i, t in enumerate(times) if t <= start), default=0)
        b = max(i for i, t in enumerate(times) if t < until)  # after the gap: the phase's last exports in
        fig = _fig(samples[a], samples[b], end - start, model)
        inside = [_gauges(samples[i], model) for i, t in enumerate(times) if start + 4 <= t <= end]
        fills = [g["fill"] for g in inside if g["fill"] is not None]
        c = p["client"]
        table.append({"clients": p["clients"], "mix": p["mix"], **fig,
                      "fill_mean": float(np.mean(fills)) if fills else None,
                      "fw_share": fig["fw_p50"] / fig["ttft_p50"] if fig["fw_p50"] and fig["ttft_p50"] else None,
                      "fw_share_mean": fig["fw_mean"] / fig["ttft_mean"] if fig["fw_mean"] and fig["ttft_mean"] else None,
                      "client_requests": c["requests"] - c["errors"], "client_ttft_p50": c["ttft_p50"],
                      "client_itl_p50": c["itl_p50"], "client_tok_s": c["tokens_per_s"],
                      "client_req_s": c["requests_per_s"],
                      "tokens_per_chunk": c["output_tokens"] / (c["requests"] - c["errors"]) / c["chunks_per_request"]
                      if c["chunks_per_request"] else None, "errors": c["errors"], "wall_s": c["wall_s"]})
    return {"series": series, "table": table}


# --- the report -----------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1e3:,.0f}"


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def markdown(saved: dict[str, Any], a: dict[str, Any]) -> str:
    t = a["table"]
    lines = [
        "# Metrics during a bench run", "",
        f"`{saved['command']}` on {saved['date'][:10]}, server code {saved['code']}; 2-core CPU, no GPU "
        f"(the server, HAProxy and the load generator share both cores). Whole run {saved['wall_s'] / 60:.1f} min.",
        "",
        f"Our server (private Ray, `serve_locally`, bench/smollm2.yaml's model settings) on {saved['model_id']} "
        f"(`{saved['model']}`), closed-loop streaming chat clients (bench/load.py), greedy, max_tokens "
        f"{saved['max_tokens']}; each phase issues requests for a fixed time and lets the last ones finish; "
        "an idle gap between phases. Ray's metrics endpoint was scraped every "
        f"{saved['scrape_every_s']:g} s (`RAY_metrics_report_interval_ms=1000`). Figures are the dashboard's "
        "queries (cluster/grafana.py) computed from the scrapes: rates and `histogram_quantile` (linear "
        "interpolation inside vLLM's buckets) over the whole phase, from the scrape before it to the last "
        "scrape before the next phase. Times in ms.", "",
        "![metrics over time](metrics.png)", "",
        "## Per phase", "",
        "| clients | mix | req/s | out tok/s | TTFT p50 (ingress) | replica TTFT p50 | engine TTFT p50 | "
        "framework TTFT p50 (share) | ITL p50 | queue p95 | prefill p95 | mean batch fill |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in t:
        lines.append(f"| {r['clients']} | {r['mix']} | {r['ok_s']:.2f} | {r['gen_tok_s']:.0f} | {_ms(r['ttft_p50'])} | "
                     f"{_ms(r['replica_p50'])} | {_ms(r['engine_p50'])} | {_ms(r['fw_p50'])} ({_pct(r['fw_share'])}) | {_ms(r['itl_p50'])} | "
                     f"{_ms(r['queue_p95'])} | {_ms(r['prefill_p95'])} | {_pct(r['fill_mean'])} |")
    lines += ["", "## Metrics against the clients", "",
              "The clients' TTFT is from sending the request to the first content chunk (it adds HAProxy, the "
              "network stack and the client's own event loop on the same two cores). Means "
              "(`_sum` / `_count`) are approximations: Ray 2.60's exporter replays every histogram observation at its "
              "bucket's midpoint (ray/_private/telemetry/open_telemetry_metric_recorder.py), so `_sum` is "
              "bucket-made too; quantiles are only as fine as the buckets (…, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5 s). "
              "ITL: the metric is per token, the client's per content chunk.", "",
              "| clients | mix | requests: client / TTFT count | TTFT p50: metrics / client | TTFT mean (≈) "
              "| framework share of the mean (≈) | out tok/s: metrics / client | ITL p50: metrics / client "
              "| tokens per chunk (client) |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in t:
        lines.append(f"| {r['clients']} | {r['mix']} | {r['client_requests']} / {r['ttft_count']:.0f} | "
                     f"{_ms(r['ttft_p50'])} / {_ms(r['client_ttft_p50'])} | {_ms(r['ttft_mean'])} | "
                     f"{_pct(r['fw_share_mean'])} | {r['gen_tok_s']:.0f} / {r['client_tok_s']:.0f} | "
                     f"{_ms(r['itl_p50'])} / {_ms(r['client_itl_p50'])} | {_f(r['tokens_per_chunk'])} |")
    lines += ["", "## Reading the figures", "", *reading(t), ""]
    return "\n".join(lines)


def reading(t: list[dict[str, Any]]) -> list[str]:
    """Sentences from the table (the numbers, not a judgement made elsewhere)."""
    out = []
    share = ", ".join(f"{r['clients']} {r['mix']}: {_pct(r['fw_share'])} ({_ms(r['fw_p50'])} of {_ms(r['ttft_p50'])} ms)"
                      for r in t)
    out.append(f"- The framework's share of the ingress TTFT p50 (ingress and Ray's path, outside the model "
               f"replica), per phase: {share}.")
    top = [r for r in t if r["clients"] == max(x["clients"] for x in t)]
    for r in top:
        out.append(f"- At {r['clients']} clients ({r['mix']}): TTFT p50 {_ms(r['ttft_p50'])} ms at the ingress, "
                   f"{_ms(r['replica_p50'])} ms from the call's arrival at the model replica, {_ms(r['engine_p50'])} "
                   f"ms from its submission to the engine (the difference: admission, chat template, "
                   f"tokenization); queue p95 {_ms(r['queue_p95'])} ms, prefill p95 {_ms(r['prefill_p95'])} ms, "
                   f"mean batch fill {_pct(r['fill_mean'])}, ITL p50 {_ms(r['itl_p50'])} ms.")
    diffs = ", ".join(f"{r['clients']} {r['mix']}: {_ms(r['ttft_p50'])} / {_ms(r['client_ttft_p50'])}" for r in t)
    out.append(f"- Ingress TTFT p50 from the buckets / the clients' own p50 (ms): {diffs}. Equal p50s of "
               "different histograms mean equal bucket counts around the median, not equal times: "
               "`histogram_quantile` interpolates linearly inside a bucket.")
    return out


def plot(saved: dict[str, Any], a: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = a["series"]
    t = np.array(s["t"])

    def ys(key: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in s[key]], dtype=float)

    panels = [
        ("Requests/s (ok)", [("ok_s", "ok", 1)], ""),
        ("Tokens/s", [("gen_tok_s", "generated", 1), ("prompt_tok_s", "prompt", 1)], ""),
        ("Time to first token at the ingress (ms)", [("ttft_p50", "p50", 1e3), ("ttft_p95", "p95", 1e3)], "log"),
        ("TTFT p50: framework vs engine vs replica (ms)", [("fw_p50", "framework", 1e3),
                                                          ("engine_p50", "engine", 1e3),
                                                          ("replica_p50", "replica", 1e3)], "log"),
        ("Inter-token latency (ms)", [("itl_p50", "p50", 1e3), ("itl_p95", "p95", 1e3)], ""),
        ("Queue and prefill time p95 (ms)", [("queue_p95", "queue", 1e3), ("prefill_p95", "prefill", 1e3)], "log"),
        ("Batch fill (running rows / max_running_rows)", [("fill", "fill", 100)], ""),
        ("Waiting for the engine; ongoing per deployment (Ray Serve)", [
            ("waiting", "engine: waiting requests", 1), ("ongoing_model", "Serve: processing at the model", 1),
            ("ongoing_ingress", "Serve: processing at the ingress", 1)], ""),
    ]
    fig, axes = plt.subplots(4, 2, figsize=(15, 14), sharex=True)
    for ax, (title, lines, scale) in zip(axes.flat, panels):
        for key, label, k in lines:
            ax.plot(t, ys(key) * k, label=label, linewidth=1.3, marker=".", markersize=3,
                    linestyle="--" if key in ("ongoing_ingress", "replica_p50") else "-")
        if scale:
            ax.set_yscale(scale)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left")
        for n, p in enumerate(saved["phases"]):
            ax.axvspan(p["start"], p["end"], color="tab:blue" if p["mix"] == "short" else "tab:orange",
                       alpha=0.08 + 0.04 * (n % 2), linewidth=0)
        if title.startswith("Batch"):
            ax.set_ylabel("%")
            ax.set_ylim(bottom=0)
    for ax in axes.flat:
        for p in saved["phases"]:
            ax.text((p["start"] + p["end"]) / 2, 0.98, f"{p['clients']}c {p['mix']}", ha="center", va="top",
                    fontsize=6.5, color="dimgrey", transform=ax.get_xaxis_transform())
    for ax in axes[-1]:
        ax.set_xlabel(f"seconds (each point: the {saved['window_s']:g} s before it; shaded: phases, "
                      "blue short, orange mixed)", fontsize=8)
    fig.suptitle(f"{saved['model_id']}: closed-loop streaming chat at 1, 8, 32 clients (2-core CPU, no GPU), "
                 "from Ray's metrics endpoint", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).with_name("smollm2.yaml")),
                   help="bench config whose model, mixes and `ours` settings are used")
    p.add_argument("--levels", type=ints, default=[1, 8, 32], help="client counts, e.g. 1,8,32")
    p.add_argument("--mixes", type=lambda s: s.split(","), default=["short", "mixed"],
                   help="prompt mixes of the config, each run at every level")
    p.add_argument("--phase-seconds", type=float, default=40, help="issue requests this long per phase")
    p.add_argument("--gap-seconds", type=float, default=8, help="idle time between phases")
    p.add_argument("--prompts-per-phase", type=int, default=400, help="prompt list per phase (an upper bound)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--scrape-every", type=float, default=2.0, help="seconds between scrapes")
    p.add_argument("--window-seconds", type=float, default=10.0, help="rate/quantile window of the figure")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--from-json", metavar="PATH", help="redo metrics.png/.md/.json from a saved metrics.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command = "python -m bench.metrics_run " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
    else:
        saved = run(args)
        saved["command"] = saved["command"].strip()
    a = analyse(saved)
    (out / "metrics.json").write_text(json.dumps({**saved, "table": a["table"]}, separators=(",", ":")))
    plot(saved, a, out / "metrics.png")
    report = markdown(saved, a)
    (out / "metrics.md").write_text(report)
    print(report)
    print(f"wrote {out / 'metrics.md'}, {out / 'metrics.png'}, {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
