"""The engine interface: what a model deployment may ask of the model it serves.

Contract. An engine owns one loaded model (weights, tokenizer or processor) and does all model work off
the caller's event loop. ``submit(requests)`` takes a group of requests that arrived together (one
``@serve.batch`` admission), must be called on the event loop that consumes the results, returns at
once, and gives back one :class:`EngineStream` per request, in order. The engine batches whatever is
waiting when its model thread becomes free, so groups submitted while it computes are served together
at its next step; a request's output never depends on what it was batched with. A stream is an async
iterator of lists of output records (everything the request produced since the consumer last asked);
it ends when the request is complete, or raises the :class:`~app.errors.ServingError` that failed this
request alone. Every request carries a ``cancelled`` flag: setting it (the client went away), before or
after ``submit``, frees the request's share of the batch at the engine's next step. ``apply(batching)`` changes batching bounds on a live engine; ``stats()``
returns plain counters for operators and tests; ``close()`` stops the engine and releases the model's
memory (the engine is unusable afterwards).

Engines import torch and transformers but never Ray: they run and are tested without it.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol, Sequence, TypeVar, runtime_checkable

from app.config import BatchingSpec

Out = TypeVar("Out", covariant=True)
Result = TypeVar("Result")


@runtime_checkable
class EngineStream(Protocol[Out]):
    """The output of one submitted request (see the module contract)."""

    def __aiter__(self) -> AsyncIterator[list[Out]]: ...


@runtime_checkable
class Engine(Protocol):
    """A loaded model behind the contract of this module."""

    def submit(self, requests: Sequence[Any]) -> list[EngineStream[Any]]:
        """Admit ``requests`` together; one stream per request, in order."""

    def apply(self, batching: BatchingSpec) -> None:
        """Adopt new batching bounds (the fields of ``batching`` that this engine uses)."""

    def stats(self) -> dict[str, Any]:
        """Plain counters (steps, tokens, rows, ...) for operators and tests."""

    def close(self) -> None:
        """Stop, and release the model's memory (drop references; empty the CUDA cache on a GPU)."""


def cache_root() -> Path:
    """The project's files on this machine (demo checkpoints, compiled kernels): $SERVE_TRANSFORMERS_CACHE,
    else ~/.cache/serve-transformers."""
    return Path(os.environ.get("SERVE_TRANSFORMERS_CACHE") or Path.home() / ".cache" / "serve-transformers")


def release_memory(device_type: str) -> None:
    """Return freed tensors' memory: collect garbage, empty the CUDA cache on a GPU, and on Linux ask
    glibc to hand freed heap pages back to the OS (otherwise the process keeps them resident)."""
    import gc
    import sys

    gc.collect()
    if device_type == "cuda":
        import torch

        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


# transformers' from_pretrained is not thread-safe: it builds the model under process-global state (the
# default dtype, a meta-device context, patched init and tie functions), and two threads loading at once
# fail ("Cannot copy out of meta tensor") or, worse, leave weights uninitialised. Only that step is
# serialised; fetching weights, tokenizers and moving to the device run in parallel.
FROM_PRETRAINED_LOCK = threading.Lock()


def on_passing_thread(fn: Callable[..., Result]) -> Callable[..., Result]:
    """Decorator: ``fn`` runs on a thread of its own that ends when it returns (the caller blocks; the
    result or exception is the caller's). For model loading.

    Why: torch's CPU kernels run on OpenMP (libgomp), which keeps a team of worker threads for every
    thread that ran a parallel op, for as long as that thread lives. When the process holds more such
    threads than it has CPUs, libgomp stops its workers from spinning between ops (about 100 spins
    instead of 300,000), so every op of a decode step wakes them from sleep. A load (weights copied,
    packed, initialised) runs parallel ops. On a thread that lives on (an in-process driver's main
    thread, an executor's, a replica's constructor thread when Ray gives it several OpenMP threads) it
    left a second team that made the model thread's 8-row decode step 1.5x slower on a 2-CPU machine
    (10 against 15-16 ms). A thread that ends takes its team with it."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Result:
        outcome: list[Any] = []

        def target() -> None:
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except BaseException as exc:  # handed to the caller below
                outcome.append((False, exc))

        thread = threading.Thread(target=target, name=f"{fn.__name__}-thread", daemon=True)
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return run
