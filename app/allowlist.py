"""Which model names may be loaded on demand, and from where.

:func:`resolve_allowed` is the one gate between a client-supplied model name and anything that touches
the filesystem or the hub. It is pure: it checks the name against a strict grammar first (so
``../../etc``, absolute paths, ``~``, URLs, NUL bytes, backslashes and over-long names are refused as
strings), then matches it against the allow-list entries in order, and returns the
:class:`~app.config.ChatModelSpec` the name would be served with (the entry's defaults, a ``source``
derived from the name), or None. The ingress calls it to answer 404 before anything else happens; the
multiplexed deployment calls it again (defence in depth) and, before loading, checks that a
``models_root`` name resolves inside the root (:func:`checked_source`).

:func:`nameable_models` lists the allowed names this server can name for ``/v1/models`` (it does read
directories: the models root and the hub cache).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from app.config import AllowEntry, ChatBatchingSpec, ChatModelSpec, OnDemandSpec

MAX_NAME_LENGTH = 128
# One or two segments ("name" or "org/name"), each starting with a letter or digit: no leading "/", ".",
# "~" or "-", no ":" (URLs, drive letters), no backslash, no NUL, no whitespace.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# The built-in demo chat models, vision-language ones included (deployments/models/demo.py DEMO_MODELS; a
# unit test keeps the two in step): allowed as ``demo-<name>`` by a ``source: demo`` entry.
DEMO_CHAT_MODELS = ("chat", "chat-s1", "chat-s2", "chat-m", "bench", "vlm", "vlm-smol")
DEMO_PREFIX = "demo-"


def valid_name(name: object) -> bool:
    """Whether ``name`` passes the grammar that every on-demand name must pass (string checks only)."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH and ".." not in name
            and NAME.fullmatch(name) is not None)


def _source(entry: AllowEntry, name: str, models_root: str | None) -> str | None:
    """Where ``name``'s weights come from under ``entry``, or None when the entry cannot serve it."""
    if entry.source == "demo":
        demo = name.removeprefix(DEMO_PREFIX)
        return f"demo:{demo}" if name.startswith(DEMO_PREFIX) and demo in DEMO_CHAT_MODELS else None
    if entry.source == "models_root":
        return None if "/" in name or models_root is None else os.path.join(models_root, name)
    return name  # a hub id


def _match(on_demand: OnDemandSpec | None, name: object) -> tuple[AllowEntry, str] | None:
    """The first entry admitting ``name`` and the source it gives, or None. String checks only."""
    if on_demand is None or not valid_name(name):
        return None
    assert isinstance(name, str)
    for entry in on_demand.allow:
        if fnmatch.fnmatchcase(name, entry.pattern):
            source = _source(entry, name, on_demand.models_root)
            if source is not None:
                return entry, source
    return None


def resolve_allowed(on_demand: OnDemandSpec | None, name: object) -> ChatModelSpec | None:
    """The spec ``name`` is served with on demand, or None if it is not allowed. Touches nothing."""
    match = _match(on_demand, name)
    if match is None:
        return None
    entry, source = match
    fields = entry.model_dump(exclude={"pattern", "source", "batching"})
    return ChatModelSpec(id=name, source=source, deployment=on_demand.deployment,
                         batching=ChatBatchingSpec(**entry.batching.model_dump()), **fields)


def checked_source(on_demand: OnDemandSpec | None, name: str) -> str:
    """The source to load ``name`` from, checked again: the name must be allowed, and a models_root name
    must be a directory inside the root once symlinks are resolved. Raises ValueError otherwise."""
    match = _match(on_demand, name)
    if match is None:
        raise ValueError(f"model {name!r} is not allowed")
    entry, source = match
    if entry.source != "models_root":
        return source
    root = os.path.realpath(on_demand.models_root)
    real = os.path.realpath(source)
    if real == root or os.path.commonpath([root, real]) != root:
        raise ValueError(f"model {name!r} resolves outside the models root")
    if not os.path.isdir(real):
        raise ValueError(f"model {name!r}: no such directory in the models root")
    return real


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    except OSError:
        return []


def _loadable(on_demand: OnDemandSpec, name: str) -> bool:
    try:
        checked_source(on_demand, name)
    except ValueError:
        return False
    return True


def nameable_models(on_demand: OnDemandSpec | None) -> list[str]:
    """Allowed names this server can list: exact ids of the allow-list, the demo models, the models
    root's subdirectories and the models in the local hub cache (each kept only if it is allowed).
    Reads directories: call it off the event loop."""
    if on_demand is None:
        return []
    candidates: list[str] = []
    for entry in on_demand.allow:
        if not any(c in entry.pattern for c in "*?["):
            candidates.append(entry.pattern)
        if entry.source == "demo":
            candidates += [DEMO_PREFIX + d for d in DEMO_CHAT_MODELS]
    if on_demand.models_root is not None:
        candidates += [n for n in _listdir(Path(on_demand.models_root)) if _loadable(on_demand, n)]
    candidates += [d.removeprefix("models--").replace("--", "/", 1)
                   for d in _listdir(_hub_cache()) if d.startswith("models--")]
    seen: dict[str, None] = {}
    for name in candidates:
        if name not in seen and resolve_allowed(on_demand, name) is not None:
            seen[name] = None
    return list(seen)
