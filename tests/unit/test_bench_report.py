"""The bench's pure parts on synthetic data: stats, prompts, the report writer (table, targets, plot)."""

import json

import pytest

from bench.config import BenchConfig, PromptSpec, load_config
from bench.contenders import CONTENDERS
from bench.load import RequestRecord, summarize
from bench.prompts import make_prompts
from bench.report import markdown, targets, write_report


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


def test_config_overrides_and_request_counts(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("levels: [1, 4]\nrequests_per_level: 5\nrounds_per_client: 2\n")
    config = load_config(path, max_tokens=8, levels=None)
    assert config.levels == [1, 4] and config.max_tokens == 8
    assert [config.requests_at(c) for c in (1, 4, 32)] == [5, 8, 64]
    assert set(BenchConfig().contenders) <= set(CONTENDERS)


def _level(c, tps, ttft):
    return {"concurrency": c, "requests": 8, "planned": 8, "errors": 0, "wall_s": 1.0, "output_tokens": 1,
            "requests_per_s": 1.0, "tokens_per_s": tps, "ttft_p50": ttft, "ttft_p99": ttft,
            "itl_p50": 0.01, "itl_p99": 0.02, "e2e_p50": 0.5, "e2e_p99": 0.6, "chunks_per_request": 4.0,
            "tokens_counted": "usage", "first_error": None}


def _results():
    def entry(label, levels, status="ok", error=None):
        return {"label": label, "description": label, "status": status, "error": error, "levels": levels}

    return {
        "command": "python -m bench.run --levels 1,32", "started": "2026-01-01T00:00:00",
        "machine": {"cpu": "test cpu", "cpus": 2, "memory_gib": 24, "python": "3.11", "torch": "x",
                    "transformers": "y", "ray": "z", "gpu": False, "model_params": "24.1M"},
        "config": BenchConfig(levels=[1, 32]).model_dump(),
        "contenders": {
            "ours": entry("(a) ours", [_level(1, 50, 0.060), _level(32, 800, 0.2)]),
            "ours-bs1": entry("(b) ours bs=1", [_level(1, 40, 0.05), _level(32, 100, 5.0)]),
            "tf-serve": entry("(c) transformers serve", [], "failed", "RuntimeError: boom"),
            "tf-serve-cb": entry("(c) transformers serve --cb", [_level(1, 30, 0.1), _level(32, 300, 1.0)]),
            "offline": entry("(e) offline", [_level(1, 60, 0.040), _level(32, 900, 0.3)]),
        }}


def test_targets_are_checked_from_the_figures():
    checks = targets(_results())
    # 800 vs 2 x 300 (best tf mode), 800 vs 0.8 x 900, 800 vs 5 x 100; TTFT 60 ms > 1.2 x 40 ms + 10 ms
    assert [ok for _, _, ok in checks] == [True, True, True, False]
    assert "0.89×" in checks[1][1] and "58.0 ms" in checks[3][1]


def test_report_writes_table_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")  # the `bench` extra
    results = _results()
    paths = write_report(results, tmp_path)
    md = paths["md"].read_text()
    assert md == markdown(results)
    assert "| (b) ours bs=1 | 32 | 8/8 | 0 | 1.00 | 100.0 |" in md
    assert "| 0.12× | 0.11× |" in md  # (b) at 32 clients: 100/800 and 100/900 tok/s
    assert "**did not run**" in md and "RuntimeError: boom" in md
    assert "![tokens/s and TTFT p50 vs concurrency](latest.png)" in md
    assert json.loads(paths["json"].read_text())["contenders"]["ours"]["levels"][1]["tokens_per_s"] == 800
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert "bench/results/latest.png" in text and "| (a) ours | 50 | 800 |" in text
    assert text.index("## Benchmarks") < text.index("python -m bench.run") < text.index("### Other")
    update_readme(readme, readme_section(_results()).replace("800", "900"))  # idempotent replacement
    again = readme.read_text()
    assert again.count("python -m bench.run --levels 1,32") == 1 and "| (a) ours | 50 | 900 |" in again
    assert again.count("<!-- bench.run: begin") == 1 and "### Other\n\nkeep too" in again
    readme.write_text("# y\n")
    update_readme(readme, readme_section(_results()))
    assert readme.read_text().startswith("# y\n\n## Benchmarks\n\n<!-- bench.run: begin")
