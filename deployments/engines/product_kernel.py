"""The matrix products of CPU float32 decode steps, in a C kernel compiled once per machine.

Why: at the row counts of decoding a product is one pass over its weights, so its speed is the rate at
which it reads them while keeping the vector units busy. On the 2-CPU bench machine oneDNN's product over
its own packed copy reads the bench model's weights at about 22 GB/s at one row; this kernel, over a copy
of the weights in panels of 16 outputs laid out input-major (``[panel][in][16]``, made once by
:func:`panel_product`), reads them at about 45 and takes half oneDNN's time at 1 row, about the same
at 8 (README: The decode step). Each thread streams its panels once, for up to 8 rows at a time, with every
row's 16 accumulators in registers (GCC/Clang vector types: AVX-512 or AVX2 on x86, NEON on ARM). From
16 rows on oneDNN is faster, so callers send at most :data:`KERNEL_ROWS` rows.

Contract:

- :func:`panel_product` returns ``f`` with ``f(x) == x @ weight.T + bias`` for any ``x`` [..., in]
  float32 on the CPU (else a ValueError; any number of rows, fastest up to :data:`KERNEL_ROWS`), up to
  float rounding (another summation order than oneDNN's), or None when the kernel cannot serve that
  weight (not a 2-D float32 CPU tensor, or a bias that does not match) or cannot be had on this
  machine. Callers then keep their own product: the kernel is never required. ``f`` holds the panel
  copy only, not ``weight``.
- It cannot be had off Linux, when there is no C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on
  the PATH), the build fails, torch's parallel backend is not OpenMP, or loading it would bring a second
  OpenMP runtime into the process (torch's threads and the kernel's must be one team: README, One
  OpenMP team per process). The reason is logged once.
- The library is built at most once per machine and source: in ``kernels`` under
  :func:`~deployments.engines.base.cache_root`, named by a hash of the source, the flags, the compiler
  and the CPU, written under a temporary name and renamed, so replicas starting together do not read a
  half-written file.
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

# y[r, o] = dot(w[o, :], x[r, :]) + bias[o]. Weights in panels of 16 outputs, input-major: wp[p][k][j] is
# w[16 p + j][k] (zero past ``out``). Threads split the panels; each reads its panels once, for up to 8 rows
# at a time. A function per row count (1 to 8) keeps that many rows' accumulators in registers: one 16-lane
# vector per row (one AVX-512 register, two AVX2 or four NEON ones).
_SOURCE = r"""
#include <string.h>
typedef float v16 __attribute__((vector_size(64)));

static inline v16 load(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

#define PANEL(NR)                                                                           \
static void panel##NR(const float *wp, const float *x, float *y, long in, long out, long width) { \
    v16 acc[NR];                                                                            \
    for (int r = 0; r < NR; r++) acc[r] = (v16){0};                                         \
    for (long k = 0; k < in; k++) {                                                         \
        const v16 w = load(wp + k * 16);                                                    \
        for (int r = 0; r < NR; r++) acc[r] += x[r * in + k] * w;                           \
    }                                                                                       \
    for (int r = 0; r < NR; r++) {                                                          \
        float lanes[16];                                                                    \
        memcpy(lanes, &acc[r], sizeof lanes);                                               \
        memcpy(y + r * out, lanes, width * sizeof(float));                                  \
    }                                                                                       \
}
PANEL(1) PANEL(2) PANEL(3) PANEL(4) PANEL(5) PANEL(6) PANEL(7) PANEL(8)

typedef void (*panel_fn)(const float *, const float *, float *, long, long, long);
static const panel_fn PANELS[9] = {0, panel1, panel2, panel3, panel4, panel5, panel6, panel7, panel8};

void panel_product(const float *x, const float *wp, const float *bias, float *y, long rows, long out,
                   long in, int threads) {
    const long panels = (out + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long p = 0; p < panels; p++) {
        const long o = p * 16, width = out - o < 16 ? out - o : 16;
        for (long r = 0; r < rows; r += 8)
            PANELS[rows - r < 8 ? rows - r : 8](wp + p * 16 * in, x + r * in, y + r * out + o, in, out, width);
        if (bias)
            for (long r = 0; r < rows; r++)
                for (long j = 0; j < width; j++) y[r * out + o + j] += bias[o + j];
    }
}
"""

# The most rows a caller should send: beyond them oneDNN's product over its own packed copy is faster
# (2 threads: oneDNN takes 1.9x the kernel's time at 1 row on the bench model's 33 products, 1.0x at 8;
# on its layer shapes with a larger head 1.0-1.4x at 8, 0.85-0.9x at 16 and 32).
KERNEL_ROWS = 8

_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")

Product = Callable[[torch.Tensor], torch.Tensor]


def panel_product(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Product | None:
    """``x -> x @ weight.T + bias`` through the compiled kernel over a panel copy of ``weight``, or None
    (module docstring: when, and what the caller does then)."""
    if not _servable(weight, 2) or (
            bias is not None and not (_servable(bias, 1) and bias.shape == weight.shape[:1])):
        return None
    kernel = _library()
    if kernel is None:
        return None
    out, inner = weight.shape
    panels = pack_panels(weight)
    bias = None if bias is None else bias.detach().contiguous()
    wp, b = panels.data_ptr(), (bias.data_ptr() if bias is not None else None)
    threads = torch.get_num_threads

    def product(x: torch.Tensor) -> torch.Tensor:
        # The kernel reads ``rows * inner`` floats at x's address: check what it cannot (about 1 µs).
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != inner:
            raise ValueError(
                f"product over {inner} float32 values per row on CPU, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty((*x.shape[:-1], out), dtype=torch.float32)
        if y.numel():
            kernel(x.data_ptr(), wp, b, y.data_ptr(), x.numel() // inner, out, inner, threads())
        return y

    product.panels, product.bias = panels, bias  # wp and b point into them: they live as long as product
    return product


def available() -> bool:
    """Whether this machine has the kernel (built or loaded on first call)."""
    return _library() is not None


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] as the kernel reads it: [ceil(out / 16), in, 16], outputs past ``out`` zero."""
    out, inner = weight.shape
    padded = torch.zeros((-(-out // 16) * 16, inner), dtype=weight.dtype)
    padded[:out] = weight.detach()
    return padded.view(-1, 16, inner).transpose(1, 2).contiguous()


def _servable(t: torch.Tensor, dims: int) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == dims


@functools.cache
def _library() -> Callable[..., None] | None:
    """The loaded ``panel_product`` function, built on first use; None (logged) when it cannot be had."""
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
    function = lib.panel_product
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    function.restype = None
    logger.info("product kernel: %s", path)
    return function


def _unavailable(reason: str) -> None:
    logger.info("product kernel unavailable (prefills and decode steps use oneDNN's product): %s", reason)
    return None


def _build(compiler: str) -> Path:
    """The kernel's shared library for this source, flags, compiler and CPU, compiled if not cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, version, platform.machine(), _cpu()]).encode())
    directory = cache_root() / "kernels"
    path = directory / f"panel_product-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source, built = Path(scratch) / "panel_product.c", Path(scratch) / path.name
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
