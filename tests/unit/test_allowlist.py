"""The on-demand allow-list: a strict name grammar first, then entries in order; forbidden names never
reach the filesystem or the hub."""

from __future__ import annotations

import builtins
import os

import pytest

from app.allowlist import (DEMO_CHAT_MODELS, MAX_NAME_LENGTH, checked_source, nameable_models,
                           resolve_allowed, valid_name)
from app.config import AppArgs, OnDemandSpec


def on_demand(root=None, **kw):
    allow = [{"pattern": "Qwen/*", "dtype": "bfloat16", "limits": {"max_tokens": 99}},
             {"pattern": "demo-*", "source": "demo"},
             {"pattern": "exact-model"}]
    if root is not None:
        allow.append({"pattern": "*", "source": "models_root", "trust_remote_code": True})
    return OnDemandSpec.model_validate({"allow": allow, "models_root": root, **kw})


FORBIDDEN = ["../../etc", "../etc/passwd", "/etc/passwd", "~", "~/x", "~root", "http://evil/x",
             "https://huggingface.co/Qwen/x", "file:///etc", "Qwen/../../etc", "Qwen/..", "a/b/c",
             "Qwen/x\x00", "\x00", "Qwen\\x", "C:\\x", "x" * (MAX_NAME_LENGTH + 1), "", " Qwen/x",
             "Qwen/x ", ".hidden", "-flag", "Qwen/.x", "Qwen/x..y", None, 5]


@pytest.mark.parametrize("name", FORBIDDEN)
def test_forbidden_names_are_refused_without_touching_anything(name, monkeypatch, tmp_path):
    spec = on_demand(str(tmp_path))

    def touched(*a, **k):
        raise AssertionError(f"touched the filesystem for {name!r}")

    for mod, attr in [(os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (os.path, "realpath"),
                      (os.path, "exists"), (os.path, "isdir"), (builtins, "open")]:
        monkeypatch.setattr(mod, attr, touched)
    assert resolve_allowed(spec, name) is None
    assert not valid_name(name)
    monkeypatch.undo()
    with pytest.raises(ValueError):
        checked_source(spec, name)


def test_entries_give_sources_and_defaults_first_match_wins(tmp_path):
    spec = on_demand(str(tmp_path))
    qwen = resolve_allowed(spec, "Qwen/Qwen2.5-0.5B-Instruct")
    assert qwen.source == "Qwen/Qwen2.5-0.5B-Instruct" and qwen.dtype == "bfloat16"
    assert qwen.limits.max_tokens == 99 and not qwen.trust_remote_code
    assert qwen.deployment_name == "on-demand"
    assert resolve_allowed(spec, "demo-chat-s1").source == "demo:chat-s1"
    assert resolve_allowed(spec, "exact-model").source == "exact-model"
    local = resolve_allowed(spec, "my-model")
    assert local.source == os.path.join(str(tmp_path), "my-model") and local.trust_remote_code
    assert resolve_allowed(spec, "Other/model") is None  # a slash: not a models_root name, no hub entry
    assert resolve_allowed(on_demand(), "my-model") is None  # no models root entry
    assert resolve_allowed(on_demand(), "demo-nope") is None  # not a built-in demo model
    assert resolve_allowed(None, "demo-chat") is None


def test_models_root_names_must_resolve_inside_the_root(tmp_path):
    root = tmp_path / "models"
    (root / "good").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "escape")
    spec = on_demand(str(root))
    assert checked_source(spec, "good") == os.path.realpath(root / "good")
    with pytest.raises(ValueError, match="outside"):
        checked_source(spec, "escape")
    with pytest.raises(ValueError, match="no such directory"):
        checked_source(spec, "missing")


def test_nameable_models_lists_allowed_names_only(tmp_path, monkeypatch):
    root = tmp_path / "models"
    for d in ["alpha", "beta", ".hidden", "bad name"]:
        (root / d).mkdir(parents=True)
    os.symlink(tmp_path, root / "escape")  # leads out of the root: not listed
    cache = tmp_path / "hub"
    for d in ["models--Qwen--Qwen2.5-0.5B", "models--Other--thing", "datasets--x--y"]:
        (cache / d).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    names = nameable_models(on_demand(str(root)))
    assert {"alpha", "beta", "exact-model", "Qwen/Qwen2.5-0.5B"} <= set(names)
    assert {f"demo-{d}" for d in DEMO_CHAT_MODELS} <= set(names)
    assert not {".hidden", "bad name", "Other/thing", "escape"} & set(names)


def test_demo_family_matches_the_built_in_demo_models():
    from deployments.models.demo import DEMO_MODELS, CausalLMDemo
    from deployments.models.vlm_demo import Idefics3Demo, Qwen2VLDemo

    chat = (CausalLMDemo, Qwen2VLDemo, Idefics3Demo)
    assert set(DEMO_CHAT_MODELS) == {n for n, b in DEMO_MODELS.items() if isinstance(b, chat)}


def test_config_on_demand_section():
    args = AppArgs.model_validate({"on_demand": {"allow": [{"pattern": "demo-*", "source": "demo"}]}})
    assert args.models == [] and args.on_demand.max_models_per_replica == 2
    with pytest.raises(ValueError, match="models_root"):
        OnDemandSpec.model_validate({"allow": [{"pattern": "*", "source": "models_root"}]})
    with pytest.raises(ValueError, match="already the name"):
        AppArgs.model_validate({"models": [{"id": "x", "source": "demo:chat", "deployment": "on-demand"}],
                                "on_demand": {"allow": [{"pattern": "demo-*", "source": "demo"}]}})
    with pytest.raises(ValueError, match="max_batch_size"):  # no @serve.batch admission on demand
        OnDemandSpec.model_validate({"allow": [{"pattern": "x", "batching": {"max_batch_size": 4}}]})
    spec = resolve_allowed(OnDemandSpec.model_validate(
        {"allow": [{"pattern": "x", "batching": {"max_running_rows": 5}}]}), "x")
    assert spec.batching.max_running_rows == 5
    with pytest.raises(ValueError, match="typo"):
        OnDemandSpec.model_validate({"allow": [{"pattern": "x", "typo": 1}]})
