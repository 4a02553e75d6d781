"""Resolve a model ``source`` string to a local checkpoint directory.

Three kinds, tried in this order:

- ``demo:<name>``: built by :mod:`deployments.models.demo` on first use (no download);
- an existing local directory;
- a Hugging Face hub id (``org/name``), fetched through the normal hub cache. With ``HF_HUB_OFFLINE=1``
  only the cache is read, and a model that is not cached fails with a message saying how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

from deployments.models.demo import demo_path

DEMO_PREFIX = "demo:"


class SourceError(RuntimeError):
    """A model source cannot be resolved; the message says why and what to do."""


def resolve_source(source: str, revision: str | None = None) -> Path:
    """Return a local directory holding the checkpoint named by ``source``."""
    if source.startswith(DEMO_PREFIX):
        try:
            return demo_path(source[len(DEMO_PREFIX):])
        except KeyError as exc:
            raise SourceError(str(exc.args[0])) from None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.startswith((".", "/", "~")):
        raise SourceError(f"model directory {source!r} does not exist")
    return _from_hub(source, revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        # Weights and tokenizer files only: skip other frameworks' copies of the weights.
        return Path(snapshot_download(
            repo_id, revision=revision, local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        ))
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        hint = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids a download; "
                f"run `huggingface-cli download {repo_id}` where the hub is reachable, or point "
                "`source` at a local directory" if offline else
                "the download failed; check the id, your network, and HF_TOKEN for gated models")
        raise SourceError(f"cannot load model {repo_id!r}: {hint} ({type(exc).__name__}: {exc})") from exc
