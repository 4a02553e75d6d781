"""Model sources: demo builds, local directories, the hub cache with HF_HUB_OFFLINE honoured."""

import pytest

from deployments.models.sources import SourceError, resolve_source


def test_demo_and_local_directory(tmp_path):
    demo = resolve_source("demo:chat")
    assert (demo / "config.json").exists() and (demo / "tokenizer.json").exists()
    assert resolve_source(str(demo)) == demo
    with pytest.raises(SourceError, match="unknown demo model 'nope'"):
        resolve_source("demo:nope")
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))


def test_hub_id_reads_the_cache_offline(tmp_path, monkeypatch):
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_source("acme/tiny") == snapshot
    with pytest.raises(SourceError) as info:
        resolve_source("acme/not-cached")
    assert "HF_HUB_OFFLINE=1" in str(info.value) and "huggingface-cli download acme/not-cached" in str(info.value)


def test_device_and_dtype_choice_without_a_gpu(monkeypatch):
    import torch

    from app.config import ChatModelSpec
    from deployments.models.loader import pick_device, pick_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = ChatModelSpec(id="m", source="demo:chat")
    assert pick_device(spec).type == "cpu" and pick_dtype(spec, pick_device(spec)) == torch.float32
    half = ChatModelSpec(id="m", source="demo:chat", dtype="bfloat16")
    assert pick_dtype(half, torch.device("cpu")) == torch.bfloat16
    assert pick_device(ChatModelSpec(id="m", source="demo:chat", device="cuda")).type == "cuda"
