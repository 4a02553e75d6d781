"""A one-row matrix product for CPU decode steps in float32, compiled once per machine with its C compiler.

Why: at one row (a single stream decoding) a step is one pass over every weight, so its speed is the
rate at which the products read memory. On the 2-CPU bench machine oneDNN's product of one row by the
packed weights reads them at about 22 GB/s and the library's ``F.linear`` at 15, while a plain pass over
the same tensors (``sum``) reads 32; this kernel, a straight pass over each weight row with the row's
dot product in 8-wide vector lanes, reads about 30 (README: The decode step). At 2 or more rows the
packed product stays: there the products are arithmetic, not reads.

Contract:

- :func:`row_product` returns ``f`` with ``f(x) == x @ weight.T + bias`` for an ``x`` of one row
  ([1, in] float32 on the CPU, else a ValueError), up to float rounding (the lanes sum in another order
  than oneDNN), or None when the kernel cannot serve that weight (not a contiguous float32 CPU tensor)
  or cannot be had on this machine. Callers then keep their own product: the kernel is never required.
- It cannot be had off Linux, when there is no C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on
  the PATH), the build fails, torch's parallel backend is not OpenMP, or loading it would bring a second
  OpenMP runtime into the process (torch's threads and the kernel's must be one team: README, One
  OpenMP team per process). The reason is logged once.
- The library is built at most once per machine and source: in ``kernels`` under
  :func:`~deployments.engines.base.cache_root`, named by a hash of the source, the flags, the compiler
  and the CPU, written under a temporary name and renamed, so replicas starting together do not read a half-
  written file.
- The product runs on as many OpenMP threads as torch's ``get_num_threads()`` in the calling thread and
  releases the GIL (a ``ctypes`` call), as torch's own ops do.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

from deployments.engines.base import cache_root

logger = logging.getLogger(__name__)

# y[o] = dot(w[o, :], x) + bias[o] for o < out, rows split evenly across the threads. Four weight rows per
# pass share each load of x; GCC/Clang vector types keep it portable (AVX2 on x86, NEON on ARM).
_SOURCE = r"""
#include <string.h>
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }

static inline float lanes(v8 v) {
    float s = 0.f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

static inline float finish(v8 acc, const float *w, const float *x, long from, long in) {
    float s = lanes(acc);
    for (long j = from; j < in; j++) s += w[j] * x[j];
    return s;
}

void row_product(const float *x, const float *w, const float *bias, float *y, long out, long in,
                 int threads) {
    const long blocks = (out + 3) / 4, vec = in & ~7L;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        const long o = b * 4;
        if (o + 4 <= out) {
            const float *r0 = w + o * in, *r1 = r0 + in, *r2 = r1 + in, *r3 = r2 + in;
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (long i = 0; i < vec; i += 8) {
                v8 xv = load(x + i);
                a0 += load(r0 + i) * xv;
                a1 += load(r1 + i) * xv;
                a2 += load(r2 + i) * xv;
                a3 += load(r3 + i) * xv;
            }
            y[o] = finish(a0, r0, x, vec, in);
            y[o + 1] = finish(a1, r1, x, vec, in);
            y[o + 2] = finish(a2, r2, x, vec, in);
            y[o + 3] = finish(a3, r3, x, vec, in);
        } else {
            for (long r = o; r < out; r++) {
                v8 a = {0};
                for (long i = 0; i < vec; i += 8) a += load(w + r * in + i) * load(x + i);
                y[r] = finish(a, w + r * in, x, vec, in);
            }
        }
        if (bias)
            for (long r = o; r < out && r < o + 4; r++) y[r] += bias[r];
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")

Product = Callable[[torch.Tensor], torch.Tensor]


def row_product(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Product | None:
    """``x -> x @ weight.T + bias`` for one row ``x`` through the compiled kernel, or None (module
    docstring: when, and what the caller does then)."""
    if not _servable(weight) or (bias is not None and not (_servable(bias) and bias.shape == weight.shape[:1])):
        return None
    kernel = _library()
    if kernel is None:
        return None
    out, inner = weight.shape
    w, b = weight.data_ptr(), (bias.data_ptr() if bias is not None else None)
    threads = torch.get_num_threads

    def product(x: torch.Tensor) -> torch.Tensor:
        # The kernel reads ``inner`` floats at x's address: check what it cannot (about 1 µs).
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() != inner:
            raise ValueError(f"row product of {inner} float32 values on CPU, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty((1, out), dtype=torch.float32)
        kernel(x.data_ptr(), w, b, y.data_ptr(), out, inner, threads())
        return y

    product.weight, product.bias = weight, bias  # w and b point into them: they live as long as product
    return product


def _servable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.dim() in (1, 2)


@functools.cache
def _library() -> Callable[..., None] | None:
    """The loaded ``row_product`` function, built on first use; None (logged) when it cannot be had."""
    if platform.system() != "Linux":
        # Elsewhere the process's OpenMP runtimes cannot be listed, so a second one could go unnoticed.
        return _unavailable("only built on Linux")
    if "OpenMP" not in torch.__config__.parallel_info():
        return _unavailable("torch's parallel backend is not OpenMP")
    compiler = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return _unavailable("no C compiler found ($CC, cc, gcc, clang)")
    try:
        path = _build(compiler)
    except subprocess.CalledProcessError as exc:
        return _unavailable(f"{compiler} failed: {(exc.stderr or '').strip()[-400:]}")
    except (OSError, subprocess.SubprocessError) as exc:
        return _unavailable(f"building it failed: {exc}")
    before = _openmp_mappings()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return _unavailable(f"loading it failed: {exc}")
    if _openmp_mappings() != before:
        # Loaded anyway (a library cannot be unloaded safely), but never called: a second team would
        # fight torch's for the cores.
        return _unavailable("it brought a second OpenMP runtime into the process")
    function = lib.row_product
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
    function.restype = None
    logger.info("one-row product kernel: %s", path)
    return function


def _unavailable(reason: str) -> None:
    logger.info("one-row product kernel unavailable (decode steps use oneDNN's product): %s", reason)
    return None


def _build(compiler: str) -> Path:
    """The kernel's shared library for this source, flags, compiler and CPU, compiled if not cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, version, platform.machine(), _cpu()]).encode())
    directory = cache_root() / "kernels"
    path = directory / f"row_product-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source, built = Path(scratch) / "row_product.c", Path(scratch) / path.name
        source.write_text(_SOURCE)
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, path)
    return path


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and flags (Linux), else the platform's name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(lines)))


def _openmp_mappings() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines()
            if any(name in line.rsplit("/", 1)[-1] for name in _OPENMP_RUNTIMES)}
