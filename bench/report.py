"""The report: Markdown tables (headline per prompt mix, the issue's targets as ratios, CPU per token by
process, the model process's resident memory, all figures), the JSON results and a PNG plot.

``results`` is the dict :func:`bench.run.run_bench` builds: ``command``, ``machine``, ``config`` and
``contenders`` = {key: {label, description, status, error, rss_of, mixes: {mix: [LevelStats dicts, plus
``model_rss_mb``]}}}; ``rss_of`` says which process ``model_rss_mb`` measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASE, ENGINE, COMPETITOR, BS1 = "ours", "engine", "tf-serve-cb", "ours-bs1"
THREAD1 = ("ours-t1", "engine-t1")  # (a) and (f) decoding on 1 thread (diagnostic contenders)


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "–" if value is None else f"{value * scale:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def _mixes(results: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for entry in results["contenders"].values():
        seen.update(dict.fromkeys(entry.get("mixes") or {}))
    return list(seen)


def _levels(results: dict[str, Any], mix: str | None = None) -> list[int]:
    return sorted({lv["concurrency"] for e in results["contenders"].values()
                   for m, lvs in (e.get("mixes") or {}).items() if mix in (None, m) for lv in lvs})


def _stat(results: dict[str, Any], key: str, mix: str, level: int, name: str) -> Any:
    entry = results["contenders"].get(key) or {}
    for lv in (entry.get("mixes") or {}).get(mix) or []:
        if lv["concurrency"] == level:
            return lv.get(name)
    return None


def summary(results: dict[str, Any], mix: str) -> str:
    """Output tokens/s (TTFT p50) per contender (rows) and level (columns) for one mix: the headline."""
    levels = _levels(results, mix)
    head = "| out tok/s (TTFT p50) | " + " | ".join(f"{c} client{'s' * (c > 1)}" for c in levels) + " |"
    rows = [head, "|---|" + "---:|" * len(levels)]
    for key, entry in results["contenders"].items():
        if mix not in (entry.get("mixes") or {}) and entry.get("status") == "ok":
            continue
        cells = []
        for c in levels:
            tps, ttft = _stat(results, key, mix, c, "tokens_per_s"), _stat(results, key, mix, c, "ttft_p50")
            cells.append("–" if tps is None else f"{tps:,.0f} ({_fmt(ttft, 1e3)} ms)")
        rows.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets(results: dict[str, Any], mix: str) -> list[tuple[str, str, bool | None]]:
    """The issue's targets for one mix: (what, measured figures, met?); met is None where a figure is
    missing."""
    checks: list[tuple[str, str, bool | None]] = []

    def tps(key: str, level: int) -> float | None:
        return _stat(results, key, mix, level, "tokens_per_s")

    def check(what: str, value: float | None, bound: float | None, factor: float) -> None:
        if value is None or bound is None:
            checks.append((what, "not measured", None))
            return
        checks.append((what, f"{value:,.0f} vs {bound:,.0f} tok/s = **{value / bound:.2f}×**",
                       value >= factor * bound))

    for level in _levels(results, mix):
        check(f"{level} client{'s' * (level > 1)}: tok/s ≥ 1.5× transformers serve --cb", tps(BASE, level),
              tps(COMPETITOR, level), 1.5)

    def against_engine(ours: str, engine: str, where: str = "") -> None:
        for level in (lv for lv in _levels(results, mix) if lv >= 8):
            check(f"{level} clients{where}: tok/s ≥ 0.8× engine alone", tps(ours, level), tps(engine, level),
                  0.8)
        ttft, direct = _stat(results, ours, mix, 1, "ttft_p50"), _stat(results, engine, mix, 1, "ttft_p50")
        what = f"1 client{where}: TTFT p50 ≤ engine alone's + 10 ms"
        if ttft is None or direct is None:
            checks.append((what, "not measured", None))
        else:
            checks.append((what, f"{ttft * 1e3:,.0f} ms vs {direct * 1e3:,.0f} + 10 ms", ttft <= direct + 0.010))

    against_engine(BASE, ENGINE)
    top = max(_levels(results, mix), default=None)
    if top is not None and tps(BS1, top) is not None:
        check(f"{top} clients: tok/s ≥ 5× ours max_batch_size=1 (batching gain)", tps(BASE, top),
              tps(BS1, top), 5)
    if any(tps(key, level) is not None for key in THREAD1 for level in _levels(results, mix)):
        # What a machine with a core for the path gives: both on 1 decode thread, the other core free.
        against_engine(*THREAD1, where=" (1 decode thread: a core for the path)")
    return checks


def cpu_table(results: dict[str, Any], key: str = BASE) -> str:
    """CPU milliseconds per output token by process role of one server contender, per mix and level."""
    roles = sorted({r for m in _mixes(results) for c in _levels(results, m)
                    for r in (_stat(results, key, m, c, "cpu_ms_per_token") or {})})
    if not roles:
        return "(not measured)"
    rows = ["| mix | clients | " + " | ".join(roles) + " | total | tokens per message |",
            "|---|---:|" + "---:|" * (len(roles) + 2)]
    for mix in _mixes(results):
        for c in _levels(results, mix):
            cpu = _stat(results, key, mix, c, "cpu_ms_per_token")
            if not cpu:
                continue
            tokens = _stat(results, key, mix, c, "output_tokens") or 0
            ok = (_stat(results, key, mix, c, "requests") or 0) - (_stat(results, key, mix, c, "errors") or 0)
            chunks = (_stat(results, key, mix, c, "chunks_per_request") or 0) * ok
            rows.append(f"| {mix} | {c} | " + " | ".join(_fmt(cpu.get(r), digits=2) for r in roles)
                        + f" | {sum(cpu.values()):.2f} | {_fmt(tokens / chunks if chunks else None, digits=1)} |")
    return "\n".join(rows)


def memory_table(results: dict[str, Any]) -> str:
    """Peak resident memory (MB) of each contender's model process over all its levels (``model_rss_mb``
    of the level figures, sampled by bench.run during every level), with what was measured and where
    the peak fell."""
    rows = ["| contender | process measured | peak RSS MB | at (mix, clients) |", "|---|---|---:|---|"]
    for entry in results["contenders"].values():
        peaks = [(lv["model_rss_mb"], mix, lv["concurrency"]) for mix, lvs in (entry.get("mixes") or {}).items()
                 for lv in lvs if lv.get("model_rss_mb") is not None]
        if peaks:
            mb, mix, c = max(peaks)
            rows.append(f"| {entry['label']} | {entry.get('rss_of') or '–'} | {mb:,.0f} | {mix}, {c} |")
    return "\n".join(rows) if len(rows) > 2 else "(not measured)"


def table(results: dict[str, Any]) -> str:
    head = ("| contender | mix | clients | done/planned | errors | req/s | out tok/s | TTFT p50 ms "
            "| TTFT p99 ms | ITL p50 ms | ITL p99 ms | E2E p50 s | E2E p99 s | chunks/req "
            "| tok/s ÷ (a) | tok/s ÷ engine |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, entry in results["contenders"].items():
        if entry.get("status") != "ok":
            rows.append(f"| {entry['label']} | – | – | – | – | – | **did not run** (see notes) |"
                        + " – |" * 9)
            continue
        for mix, levels in entry["mixes"].items():
            for lv in levels:
                c = lv["concurrency"]
                rows.append(
                    f"| {entry['label']} | {mix} | {c} | {lv['requests']}/{lv['planned']} | {lv['errors']} "
                    f"| {_fmt(lv['requests_per_s'], digits=2)} | {_fmt(lv['tokens_per_s'], digits=1)} "
                    f"| {_fmt(lv['ttft_p50'], 1e3)} | {_fmt(lv['ttft_p99'], 1e3)} "
                    f"| {_fmt(lv['itl_p50'], 1e3, 1)} | {_fmt(lv['itl_p99'], 1e3, 1)} "
                    f"| {_fmt(lv['e2e_p50'], digits=2)} | {_fmt(lv['e2e_p99'], digits=2)} "
                    f"| {_fmt(lv.get('chunks_per_request'), digits=1)} "
                    f"| {_ratio(lv['tokens_per_s'], _stat(results, BASE, mix, c, 'tokens_per_s'))} "
                    f"| {_ratio(lv['tokens_per_s'], _stat(results, ENGINE, mix, c, 'tokens_per_s'))} |")
    return "\n".join(rows)


def _targets_md(results: dict[str, Any]) -> list[str]:
    lines = ["| mix | target | measured | met |", "|---|---|---|---|"]
    for mix in _mixes(results):
        lines += [f"| {mix} | {what} | {fig} | {'–' if ok is None else ('yes' if ok else '**no**')} |"
                  for what, fig, ok in targets(results, mix)]
    return lines


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    mixes = cfg.get("mixes") or {}
    lines = [
        "# Benchmark: streaming chat, side by side", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs, {m['memory_gib']:.0f} GiB, no GPU); Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, Ray {m['ray']}; {results['started']}  ",
        f"Server code: {m.get('code', 'unknown')}  ",
        f"Model: `{cfg['model']}` ({m.get('model_params', '?')} parameters); max_tokens {cfg['max_tokens']}, "
        f"greedy, streaming; requests per level and round = max({cfg['requests_per_level']}, "
        f"{cfg['rounds_per_client']} × clients), {cfg.get('rounds', 1)} round(s) in alternating contender "
        f"order, pooled; at most {cfg['max_level_seconds']:.0f} s of issuing per level.  ",
        "Prompt mixes: " + "; ".join(f"**{name}** = {spec.get('buckets')} (share, min words, max words), "
                                     f"system share {spec.get('system_share')}" for name, spec in mixes.items()),
        "",
    ]
    for mix in _mixes(results):
        lines += [f"## Output tokens/s (TTFT p50): {mix} prompts", "", summary(results, mix), ""]
    lines += ["## Targets", "", *_targets_md(results), "",
              "## CPU per output token by process, ours (a)", "",
              "CPU milliseconds each process role spent per output token during the level (`bench/cpu.py`): "
              "proxy = HAProxy in front of the ingress (and Ray Serve's idle Python proxy), ingress = the FastAPI replica, model = the model replica "
              "(engine threads and its event loop), ray = Ray's daemons, client = the load generator.", "",
              cpu_table(results), "",
              "## Resident memory of the model's process", "",
              "Peak RSS over each contender's levels, sampled every second during a level: our server's "
              "model replica (the Ray worker `ray::ServeReplica:...` of the model deployment; not the ingress, "
              "proxy or Ray daemons), another server's whole process tree (summed: `transformers serve "
              "--continuous-batching` holds its model in a spawned child), and for an in-process contender "
              "how much the bench process grew after it started (a lower bound once an earlier in-process "
              "contender has freed memory the allocator kept). RSS counts the shared libraries (torch) too.",
              "", memory_table(results), "",
              "## All figures", "", table(results), "",
              "TTFT: request sent → first non-empty content chunk. ITL: gap between consecutive non-empty "
              "content chunks, **per chunk** (a chunk carries several tokens when a server coalesces; the "
              "generate contender has one token per step). Tokens/s: output tokens (counted from `usage`, not "
              "assumed) of all requests ÷ the level's wall time.", "",
              "## Contenders", "",
              *[f"- **{e['label']}**: {e['description']}" for e in results["contenders"].values()], "",
              "![tokens/s and TTFT p50 vs concurrency](latest.png)", ""]
    notes = [(e["label"], e["error"]) for e in results["contenders"].values() if e.get("error")]
    notes += [(e["label"], f"{mix} level {lv['concurrency']}: {lv['errors']} errors, first: {lv['first_error']}")
              for e in results["contenders"].values() for mix, lvs in (e.get("mixes") or {}).items()
              for lv in lvs if lv["errors"]]
    if notes:
        lines += ["## Notes", "", *[f"- {label}: ```{err.strip()[:1500]}```" for label, err in notes], ""]
    return "\n".join(lines)


def readme_section(results: dict[str, Any], results_dir: str = "bench/results") -> str:
    """The chat comparison's block (bench/README.md, between the markers): command, machine, headline
    tables, plot, full table link; ``results_dir`` as a link from the file it goes into."""
    m, cfg = results["machine"], results["config"]
    md = markdown(results)
    body = md[md.index("## Output tokens/s"):md.index("## All figures")].replace("\n## ", "\n### ")
    return "\n".join([
        "## Benchmarks", "",
        "`bench/` starts every contender in turn on the same model and prompts, drives its streaming chat "
        "endpoint at fixed client counts with each prompt mix, stops it, and writes a table, JSON and a "
        "plot. Reproduce (about 40 minutes; needs the `bench` extra, `pip install -e .[bench]`):", "",
        f"```bash\n{results['command']}\n```", "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']:.0f} GiB, no GPU (a small machine "
        f"whose timings vary run to run: compare contenders within one run); torch {m['torch']}, "
        f"transformers {m['transformers']}, Ray {m['ray']}; run {results['started']} at commit "
        f"{m.get('code', 'unknown')}. Model `{cfg['model']}` ({m.get('model_params', '?')} parameters, "
        f"Qwen2-style, hidden 512, 8 layers), max_tokens {cfg['max_tokens']}, greedy.", "",
        f"![tokens/s and TTFT p50 vs concurrency]({results_dir}/latest.png)", "",
        "#" + body.rstrip(), "",
        "Contenders: " + "; ".join(f"**{e['label']}** = {e['description']}"
                                   for e in results["contenders"].values()) + ".", "",
        f"Full report with every figure and notes: [{results_dir}/latest.md]({results_dir}/latest.md).", ""])


BEGIN, END = "<!-- bench.run: begin (generated by python -m bench.run --readme) -->", "<!-- bench.run: end -->"


def update_readme(readme: Path, section: str) -> None:
    """Put ``section`` (minus its ``## Benchmarks`` heading) between the bench markers of ``readme``.

    Only the text between the markers is replaced; without markers, the block is inserted right under the
    ``## Benchmarks`` heading (created at the end if missing). Other subsections are never touched.
    """
    text = readme.read_text()
    block = BEGIN + "\n" + section.split("\n", 1)[1].strip("\n") + "\n" + END
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    elif "\n## Benchmarks\n" in text:
        at = text.index("\n## Benchmarks\n") + len("\n## Benchmarks\n")
        text = text[:at] + "\n" + block + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + block + "\n"
    readme.write_text(text)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = _mixes(results) or ["-"]
    fig, axes = plt.subplots(len(mixes), 2, figsize=(12, 4.2 * len(mixes)), squeeze=False)
    for (ax_tps, ax_ttft), mix in zip(axes, mixes):
        for entry in results["contenders"].values():
            levels = sorted((entry.get("mixes") or {}).get(mix) or [], key=lambda lv: lv["concurrency"])
            if not levels:
                continue
            xs = [lv["concurrency"] for lv in levels]
            ax_tps.plot(xs, [lv["tokens_per_s"] for lv in levels], marker="o", label=entry["label"])
            ttft = [(lv["concurrency"], lv["ttft_p50"] * 1e3) for lv in levels if lv["ttft_p50"] is not None]
            if ttft:
                ax_ttft.plot(*zip(*ttft), marker="o", label=entry["label"])
        for ax, title, unit in ((ax_tps, "output tokens/s", "tokens/s"), (ax_ttft, "TTFT p50", "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent streaming clients")
            ax.set_ylabel(unit)
            ax.set_title(f"{title}, {mix} prompts")
            ax.grid(True, alpha=0.3)
        ax_ttft.set_yscale("log")
        ax_tps.legend(fontsize=8)
    fig.suptitle(f"{results['config']['model']}, max_tokens {results['config']['max_tokens']}, "
                 f"{results['machine']['cpus']}-CPU machine")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: Path, stem: str = "latest") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    paths["json"].write_text(json.dumps(results, indent=2))
    md = markdown(results)
    if stem != "latest":
        md = md.replace("(latest.png)", f"({stem}.png)")
    paths["md"].write_text(md)
    plot(results, paths["png"])
    return paths
