"""sentence-transformers' ``encode`` as a test oracle, run in a fresh interpreter.

Importing sentence-transformers loads scikit-learn, which maps its own copy of libgomp into the process: a
second OpenMP runtime beside torch's, which ``tests/unit/test_product_kernel.py`` forbids in the test
process (and which makes torch's CPU ops slower there, see ``deployments/engines/base.py``). So the oracle
encodes every text it will be asked about once, in a subprocess, and answers lookups.

Run as a module it is that subprocess: a JSON list of ``[checkpoint dir, texts, truncate_dim]`` on
stdin, an ``.npz`` file path as its argument (array ``i`` = the vectors of job ``i``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class Oracle:
    """``SentenceTransformer(path).encode(text, truncate_dim=...)`` of each (path, text, truncate_dim) of
    ``jobs``, computed once in a subprocess; :meth:`encode` looks vectors up (rows are independent)."""

    def __init__(self, jobs: Sequence[tuple[str | Path, Sequence[str], int | None]]) -> None:
        payload = json.dumps([[str(path), list(texts), dim] for path, texts, dim in jobs])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "vectors.npz"
            subprocess.run([sys.executable, "-m", "tests.st_oracle", str(out)], input=payload, text=True,
                           cwd=ROOT, check=True, capture_output=True)
            arrays = np.load(out)
            self._vectors = {(str(path), text, dim): arrays[f"arr_{i}"][k]
                             for i, (path, texts, dim) in enumerate(jobs) for k, text in enumerate(texts)}

    def encode(self, path: str | Path, texts: str | Sequence[str], truncate_dim: int | None = None) -> np.ndarray:
        single = isinstance(texts, str)
        rows = np.stack([self._vectors[(str(path), t, truncate_dim)] for t in ([texts] if single else texts)])
        return rows[0] if single else rows


def _main() -> None:
    from sentence_transformers import SentenceTransformer

    jobs = json.loads(sys.stdin.read())
    models: dict[str, SentenceTransformer] = {}
    results = []
    for path, texts, dim in jobs:
        model = models.get(path) or models.setdefault(path, SentenceTransformer(path, device="cpu"))
        results.append(model.encode(texts, truncate_dim=dim))
    np.savez(sys.argv[1], *results)


if __name__ == "__main__":
    _main()
