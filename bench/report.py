"""The report: a Markdown table (with ratios to (a) and to (e)), the JSON results and a PNG plot.

``results`` is the dict :func:`bench.run.run_bench` builds: ``command``, ``machine``, ``config`` and
``contenders`` = {key: {label, description, status, error, levels: [LevelStats dicts]}}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASE, CEILING = "ours", "offline"  # the (a) and (e)
TARGET_LEVEL = 32


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "–" if value is None else f"{value * scale:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def _by_level(results: dict[str, Any], key: str) -> dict[int, dict[str, Any]]:
    entry = results["contenders"].get(key) or {}
    return {lv["concurrency"]: lv for lv in entry.get("levels") or []}


def _stat(results: dict[str, Any], key: str, level: int, name: str) -> float | None:
    return (_by_level(results, key).get(level) or {}).get(name)


def table(results: dict[str, Any]) -> str:
    head = ("| contender | clients | done/planned | errors | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms "
            "| ITL p50 ms | ITL p99 ms | E2E p50 s | E2E p99 s | tok/s ÷ (a) | tok/s ÷ (e) "
            "| TTFT p50 ÷ (a) | TTFT p50 ÷ (e) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, entry in results["contenders"].items():
        if entry.get("status") != "ok":
            rows.append(f"| {entry['label']} | – | – | – | – | **did not run** (see notes) |"
                        + " – |" * 10)
            continue
        for lv in entry["levels"]:
            c = lv["concurrency"]
            rows.append(
                f"| {entry['label']} | {c} | {lv['requests']}/{lv['planned']} | {lv['errors']} "
                f"| {_fmt(lv['requests_per_s'], digits=2)} | {_fmt(lv['tokens_per_s'], digits=1)} "
                f"| {_fmt(lv['ttft_p50'], 1e3)} | {_fmt(lv['ttft_p99'], 1e3)} "
                f"| {_fmt(lv['itl_p50'], 1e3, 1)} | {_fmt(lv['itl_p99'], 1e3, 1)} "
                f"| {_fmt(lv['e2e_p50'], digits=2)} | {_fmt(lv['e2e_p99'], digits=2)} "
                f"| {_ratio(lv['tokens_per_s'], _stat(results, BASE, c, 'tokens_per_s'))} "
                f"| {_ratio(lv['tokens_per_s'], _stat(results, CEILING, c, 'tokens_per_s'))} "
                f"| {_ratio(lv['ttft_p50'], _stat(results, BASE, c, 'ttft_p50'))} "
                f"| {_ratio(lv['ttft_p50'], _stat(results, CEILING, c, 'ttft_p50'))} |")
    return "\n".join(rows)


def summary(results: dict[str, Any]) -> str:
    """Output tokens/s per contender (rows) and level (columns): the headline pivot."""
    levels = sorted({lv["concurrency"] for e in results["contenders"].values() for lv in e.get("levels") or []})
    head = "| out tok/s | " + " | ".join(f"{c} clients" for c in levels) + " |"
    rows = [head, "|---|" + "---:|" * len(levels)]
    for key, entry in results["contenders"].items():
        cells = []
        for c in levels:
            tps = _stat(results, key, c, "tokens_per_s")
            cells.append("–" if tps is None else f"{tps:,.0f}")
        rows.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets(results: dict[str, Any], level: int = TARGET_LEVEL) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (what, measured figures, met?); met is None where a figure is missing."""
    ours = _stat(results, BASE, level, "tokens_per_s")
    checks: list[tuple[str, str, bool | None]] = []

    def check(what: str, value: float | None, bound: float | None, factor: float, unit: str) -> None:
        if value is None or bound is None:
            checks.append((what, "not measured", None))
            return
        checks.append((what, f"{value:,.1f} vs {factor}× {bound:,.1f} {unit} (= {value / bound:.2f}×)",
                       value >= factor * bound))

    tf = [t for t in (_stat(results, k, level, "tokens_per_s") for k in ("tf-serve", "tf-serve-cb"))
          if t is not None]
    check(f"tok/s at {level} clients ≥ 2× transformers serve's best mode", ours, max(tf, default=None),
          2, "tok/s")
    check(f"tok/s at {level} clients ≥ 0.8× offline ceiling", ours,
          _stat(results, CEILING, level, "tokens_per_s"), 0.8, "tok/s")
    check(f"tok/s at {level} clients ≥ 5× ours max_batch_size=1", ours,
          _stat(results, "ours-bs1", level, "tokens_per_s"), 5, "tok/s")
    ttft, direct = _stat(results, BASE, 1, "ttft_p50"), _stat(results, CEILING, 1, "ttft_p50")
    if ttft is None or direct is None:
        checks.append(("TTFT p50 at 1 client ≤ 1.2× direct generate + 10 ms", "not measured", None))
    else:
        bound = 1.2 * direct + 0.010
        checks.append(("TTFT p50 at 1 client ≤ 1.2× direct generate + 10 ms",
                       f"{ttft * 1e3:,.1f} ms vs bound {bound * 1e3:,.1f} ms (direct {direct * 1e3:,.1f} ms)",
                       ttft <= bound))
    return checks


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    lines = [
        "# Benchmark: streaming chat, side by side", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs, {m['memory_gib']:.0f} GiB, no GPU); Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, Ray {m['ray']}; {results['started']}  ",
        f"Server code: {m.get('code', 'unknown')}  ",
        f"Model: `{cfg['model']}` ({m.get('model_params', '?')} parameters); max_tokens {cfg['max_tokens']}, "
        f"greedy, streaming, prompts seed {cfg['prompts']['seed']} (mixed lengths); requests per level = "
        f"max({cfg['requests_per_level']}, {cfg['rounds_per_client']} × clients), capped at "
        f"{cfg['max_level_seconds']:.0f} s of issuing per level.", "",
        "## Output tokens/s", "", summary(results), "",
        f"## Targets (at {TARGET_LEVEL} clients)", "",
        "| target | measured | met |", "|---|---|---|",
        *[f"| {what} | {fig} | {'–' if ok is None else ('yes' if ok else '**no**')} |"
          for what, fig, ok in targets(results)], "",
        "## All figures", "", table(results), "",
        "TTFT: request sent → first non-empty content chunk. ITL: gap between consecutive non-empty content "
        "chunks, **per chunk** (a chunk may carry several tokens when a server coalesces; the offline "
        "contender has one token per step). Tokens/s: output tokens (counted from `usage`, not assumed) of "
        "all requests ÷ the level's wall time. Ratios compare with (a) and (e) at the same client count.", "",
        "## Contenders", "",
        *[f"- **{e['label']}**: {e['description']}" for e in results["contenders"].values()], "",
        "![tokens/s and TTFT p50 vs concurrency](latest.png)", "",
    ]
    notes = [(e["label"], e["error"]) for e in results["contenders"].values() if e.get("error")]
    notes += [(e["label"], f"level {lv['concurrency']}: {lv['errors']} errors, first: {lv['first_error']}")
              for e in results["contenders"].values() for lv in e.get("levels") or [] if lv["errors"]]
    if notes:
        lines += ["## Notes", "", *[f"- {label}: ```{err.strip()[:1500]}```" for label, err in notes], ""]
    return "\n".join(lines)


def readme_section(results: dict[str, Any], results_dir: str = "bench/results") -> str:
    """The README's ``## Benchmarks`` section: command, machine, headline tables, plot, full table link."""
    m, cfg = results["machine"], results["config"]
    body = markdown(results).split("## Output tokens/s", 1)[1].split("## Contenders", 1)[0]
    body = body.replace("\n## ", "\n### ")
    return "\n".join([
        "## Benchmarks", "",
        "`bench/` starts every contender in turn on the same model and prompts, drives its streaming chat "
        "endpoint at fixed client counts, stops it, and writes a table, JSON and a plot. Reproduce (about "
        "20 minutes; needs the `bench` extra, `pip install -e .[bench]`):", "",
        f"```bash\n{results['command']}\n```", "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']:.0f} GiB, no GPU (a small machine "
        f"whose timings vary run to run: compare contenders within one run); torch {m['torch']}, transformers {m['transformers']}, "
        f"Ray {m['ray']}; run {results['started']} at commit {m.get('code', 'unknown')}. Model `{cfg['model']}` ({m.get('model_params', '?')} "
        f"parameters, Qwen2-style, hidden 512, 8 layers), max_tokens {cfg['max_tokens']}, greedy.", "",
        f"![tokens/s and TTFT p50 vs concurrency]({results_dir}/latest.png)", "",
        "### Output tokens/s" + body.rstrip(), "",
        "Contenders: " + "; ".join(f"**{e['label']}** = {e['description']}"
                                   for e in results["contenders"].values()) + ".", "",
        f"Full report with notes: [{results_dir}/latest.md]({results_dir}/latest.md).", ""])


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

    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry in results["contenders"].values():
        levels = sorted(entry.get("levels") or [], key=lambda lv: lv["concurrency"])
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
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_ttft.set_yscale("log")
    ax_tps.legend(fontsize=8)
    fig.suptitle(f"{results['config']['model']}, max_tokens {results['config']['max_tokens']}, "
                 f"{results['machine']['cpus']}-CPU machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
