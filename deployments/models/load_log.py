"""Progress lines of one model's load, so that a load of minutes is not silent (README: Progress while
models load).

Each loader reports its phases as it passes them: where the source resolved to (a download or a GGUF
conversion happens there), how many bytes of weights it reads, when they are read, where they went, when
the engine was built, and the total. Every line names the model; Ray Serve's replica log prefix names
the replica (``replica_openai_<deployment>_<id>.log``), so a model loading on several replicas is told
apart. Lines go to Ray Serve's replica logger (``ray.serve``, by name: this module imports no Ray) at
INFO: a replica drops INFO records of other loggers, so the loader's own ``logger.info`` lines never
reach the replica's log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger("ray.serve")

# Files that hold weights, in the formats transformers reads.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_bytes(path: Path) -> tuple[int, int]:
    """(files, bytes) of the weights under a checkpoint directory (not its subdirectories' caches)."""
    files = [f for f in Path(path).iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()] \
        if Path(path).is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


class LoadLog:
    """The load of model ``model_id``: :meth:`step` logs a phase with its own seconds and the total."""

    def __init__(self, model_id: str, task: str) -> None:
        self.model_id = model_id
        self.started = self.last = time.perf_counter()
        logger.info("model %s (%s): loading", model_id, task)

    def step(self, what: str) -> None:
        now = time.perf_counter()
        logger.info("model %s: %s (%.1f s; %.1f s since the load began)", self.model_id, what,
                    now - self.last, now - self.started)
        self.last = now

    def resolved(self, source: str, path: Path) -> None:
        files, size = weight_bytes(path)
        self.step(f"source {source} resolved to {path}, {files} weight file(s), {size / 2**20:,.1f} MiB")

    def done(self, what: str) -> None:
        """The last phase (``what``: the engine built, with what the loader knows of it), then the total."""
        self.step(what)
        logger.info("model %s: ready in %.1f s", self.model_id, time.perf_counter() - self.started)
