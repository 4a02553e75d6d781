"""The bench's pure parts on synthetic data: stats, prompts, the report writer (table, targets, plot)."""

import json

import pytest

from bench.config import DEFAULT_MIXES, BenchConfig, PromptSpec, load_config
from bench.contenders import CONTENDERS
from bench.load import RequestRecord, summarize
from bench.prompts import make_prompts
from bench.report import markdown, memory_table, targets, write_report


def test_summarize_counts_tokens_chunks_and_errors():
    records = [RequestRecord(0, ttft=0.1, chunk_times=[0.1, 0.2, 0.4], e2e=0.5, output_tokens=8,
                             tokens_from_usage=True),
               RequestRecord(1, ttft=0.3, chunk_times=[0.3, 0.5], e2e=0.6, output_tokens=4,
                             tokens_from_usage=True),
               RequestRecord(2, error="HTTP 503: busy")]
    stats = summarize(records, concurrency=2, planned=3, wall_s=2.0)
    assert (stats.requests, stats.planned, stats.errors, stats.output_tokens) == (3, 3, 1, 12)
    assert stats.tokens_per_s == pytest.approx(6.0) and stats.requests_per_s == pytest.approx(1.0)
    assert stats.ttft_p50 == pytest.approx(0.2)
    assert stats.itl_p50 == pytest.approx(0.2)  # gaps 0.1, 0.2, 0.2
    assert stats.chunks_per_request == pytest.approx(2.5)
    assert stats.tokens_counted == "usage" and stats.first_error == "HTTP 503: busy"


def test_prompts_are_reproducible_with_a_stable_prefix_and_mixed_lengths():
    a, b = make_prompts(40), make_prompts(10)
    assert a[:10] == b and a == make_prompts(40)
    assert make_prompts(10, PromptSpec(seed=1)) != b
    lengths = [len(m[-1]["content"].split()) for m in a]
    assert min(lengths) < 40 and max(lengths) > 64


def test_config_overrides_request_counts_and_plans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("levels: [1, 4]\nrequests_per_level: 5\nrounds_per_client: 2\n")
    config = load_config(path, max_tokens=8, levels=None)
    assert config.levels == [1, 4] and config.max_tokens == 8
    assert [config.requests_at(c) for c in (1, 4, 32)] == [5, 8, 64]
    assert set(BenchConfig().contenders) <= set(CONTENDERS)
    assert config.plan("ours") == [("short", 1), ("short", 4), ("mixed", 1), ("mixed", 4)]
    assert config.plan("ours-bs1") == [("short", 1)]  # only what its target needs


def test_short_mix_is_short_and_mixed_mix_is_prefill_heavy():
    short, mixed = (make_prompts(64, DEFAULT_MIXES[m]) for m in ("short", "mixed"))
    words = lambda ps: [len(m[-1]["content"].split()) for m in ps]  # noqa: E731
    assert max(words(short)) <= 14 and all(len(m) == 1 for m in short)
    assert sum(words(mixed)) > 4 * sum(words(short))


def _level(c, tps, ttft, cpu=None):
    return {"concurrency": c, "requests": 8, "planned": 8, "errors": 0, "wall_s": 1.0, "output_tokens": 64,
            "requests_per_s": 1.0, "tokens_per_s": tps, "ttft_p50": ttft, "ttft_p99": ttft,
            "itl_p50": 0.01, "itl_p99": 0.02, "e2e_p50": 0.5, "e2e_p99": 0.6, "chunks_per_request": 4.0,
            "cpu_ms_per_token": cpu, "rounds": 2, "tokens_counted": "usage", "first_error": None}


def _results():
    def entry(label, mixes, status="ok", error=None):
        return {"label": label, "description": label, "status": status, "error": error, "mixes": mixes}

    both = lambda levels: {"short": levels, "mixed": levels}  # noqa: E731
    return {
        "command": "python -m bench.run --levels 1,32", "started": "2026-01-01T00:00:00",
        "machine": {"cpu": "test cpu", "cpus": 2, "memory_gib": 24, "python": "3.11", "torch": "x",
                    "transformers": "y", "ray": "z", "gpu": False, "model_params": "24.1M"},
        "config": BenchConfig(levels=[1, 32]).model_dump(),
        "contenders": {
            "ours": entry("(a) ours", both([_level(1, 150, 0.030, {"proxy": 0.5, "model": 2.0}),
                                            _level(32, 800, 0.2, {"proxy": 0.1, "model": 1.0})])),
            "ours-bs1": entry("(b) ours bs=1", {"short": [_level(1, 40, 0.05), _level(32, 100, 5.0)]}),
            "tf-serve": entry("(c) transformers serve", {}, "failed", "RuntimeError: boom"),
            "tf-serve-cb": entry("(c) transformers serve --cb", both([_level(1, 90, 0.1), _level(32, 300, 1.0)])),
            "engine": entry("(f) engine alone", both([_level(1, 160, 0.025), _level(32, 900, 0.3)])),
        }}


def test_targets_are_checked_from_the_figures():
    checks = targets(_results(), "short")
    # 150 vs 1.5 x 90 and 800 vs 1.5 x 300 (tf-serve-cb); 800 vs 0.8 x 900 (engine);
    # TTFT 30 ms <= 25 + 10 ms; 800 vs 5 x 100 (bs=1)
    assert [ok for _, _, ok in checks] == [True, True, True, True, True]
    assert "0.89×" in checks[2][1] and "8.00×" in checks[4][1]
    mixed = targets(_results(), "mixed")
    assert len(mixed) == 4  # no bs=1 figures on that mix: no batching-gain line


def test_one_thread_contenders_add_the_engine_targets_with_a_core_for_the_path():
    results = _results()
    results["contenders"]["ours-t1"] = {"label": "(a1)", "description": "", "status": "ok",
                                        "mixes": {"short": [_level(1, 90, 0.036), _level(32, 500, 0.4)]}}
    results["contenders"]["engine-t1"] = {"label": "(f1)", "description": "", "status": "ok",
                                          "mixes": {"short": [_level(1, 85, 0.024), _level(32, 560, 0.3)]}}
    extra = targets(results, "short")[5:]
    assert [(what, ok) for what, _, ok in extra] == [
        ("32 clients (1 decode thread: a core for the path): tok/s ≥ 0.8× engine alone", True),
        ("1 client (1 decode thread: a core for the path): TTFT p50 ≤ engine alone's + 10 ms", False)]
    assert "0.89×" in extra[0][1] and "36 ms vs 24 + 10 ms" in extra[1][1]
    assert len(targets(results, "mixed")) == 4  # no 1-thread figures on that mix: no extra lines


def test_report_writes_tables_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")  # the `bench` extra
    results = _results()
    paths = write_report(results, tmp_path)
    md = paths["md"].read_text()
    assert md == markdown(results)
    assert "| (a) ours | 150 (30 ms) | 800 (200 ms) |" in md
    assert "| (b) ours bs=1 | short | 32 | 8/8 | 0 | 1.00 | 100.0 |" in md
    assert "| 0.12× | 0.11× |" in md  # (b) at 32 clients: 100/800 and 100/900 tok/s
    assert "| short | 32 | 1.00 | 0.10 | 1.10 | 2.0 |" in md  # CPU ms per token by role, 64 tokens / 32 chunks
    assert "**did not run**" in md and "RuntimeError: boom" in md
    assert "![tokens/s and TTFT p50 vs concurrency](latest.png)" in md
    saved = json.loads(paths["json"].read_text())
    assert saved["contenders"]["ours"]["mixes"]["short"][1]["tokens_per_s"] == 800
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_table_reports_each_contenders_peak_and_what_it_measured():
    results = _results()
    assert memory_table(results) == "(not measured)"  # results without memory figures (older runs)
    ours, engine = results["contenders"]["ours"], results["contenders"]["engine"]
    for entry in (ours, engine):  # the fixture shares one level list between the mixes
        entry["mixes"] = {mix: [dict(lv) for lv in lvs] for mix, lvs in entry["mixes"].items()}
    ours["rss_of"], engine["rss_of"] = "model replica process", "bench process growth"
    for (mix, i), mb in {("short", 0): 900.0, ("short", 1): 1240.4, ("mixed", 0): 1100.0}.items():
        ours["mixes"][mix][i]["model_rss_mb"] = mb
    engine["mixes"]["mixed"][1]["model_rss_mb"] = 610.0
    rows = memory_table(results).splitlines()
    assert rows[2:] == ["| (a) ours | model replica process | 1,240 | short, 32 |",
                        "| (f) engine alone | bench process growth | 610 | mixed, 32 |"]  # the unmeasured are left out
    assert "## Resident memory of the model's process" in markdown(results) and rows[2] in markdown(results)


def test_model_rss_of_an_in_process_contender_is_the_bench_process_growth():
    import psutil

    from bench.run import RSS_OF, model_rss, rss_peak

    import gc

    # 512 MiB against a bound of 400: in a full suite run, memory that earlier tests freed can go back to
    # the OS meanwhile (once 64 MiB measured 0 growth), so the margin is larger than that noise.
    gc.collect()
    base = psutil.Process().memory_info().rss
    memory: dict = {}
    with rss_peak(None, base, memory, every_s=0.01):
        block = bytearray(512 * 2**20)  # zero pages from mmap: not resident until written
        block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # one write per page: resident
    assert memory["rss_of"] == RSS_OF["client"] and memory["rss_mb"] >= 400 and len(block)
    assert model_rss(None, base + 2**40)[0] == 0  # never negative


def test_readme_block_is_replaced_between_markers_only(tmp_path):
    from bench.report import readme_section, update_readme

    readme = tmp_path / "README.md"
    original = "# x\n\n## Tests\n\nkeep me\n\n## Benchmarks\n\nintro\n\n### Other\n\nkeep too\n\n## Later\n"
    readme.write_text(original)
    update_readme(readme, readme_section(_results()))
    text = readme.read_text()
    for kept in ("keep me", "intro", "### Other\n\nkeep too", "## Later"):
        assert kept in text
    assert text.count("## Benchmarks") == 1 and "python -m bench.run --levels 1,32" in text
    assert "bench/results/latest.png" in text and "| (a) ours | 150 (30 ms) | 800 (200 ms) |" in text
    assert "### Targets" in text and "### Output tokens/s (TTFT p50): mixed prompts" in text
    assert text.index("## Benchmarks") < text.index("python -m bench.run") < text.index("### Other")
    update_readme(readme, readme_section(_results()).replace("800", "900"))  # idempotent replacement
    again = readme.read_text()
    assert again.count("python -m bench.run --levels 1,32") == 1 and "| (a) ours | 150 (30 ms) | 900 (200 ms) |" in again
    assert again.count("<!-- bench.run: begin") == 1 and "### Other\n\nkeep too" in again
    readme.write_text("# y\n")
    update_readme(readme, readme_section(_results()))
    assert readme.read_text().startswith("# y\n\n## Benchmarks\n\n<!-- bench.run: begin")
