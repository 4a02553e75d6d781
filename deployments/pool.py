"""ModelPool: the models one multiplexed replica holds, loaded on demand, reference-counted, evicted LRU.

Contract (no Ray, no torch: the loader is injected, so unit tests use fakes):

- ``async with pool.use(spec) as engine`` gives the loaded engine of ``spec.id`` and holds a reference
  to it for the whole block (a stream's lifetime). The first request for a model starts its load; every
  request that arrives for it meanwhile waits for that same load (a model is loaded once, however many
  requests ask together). Loads of different models run in parallel, in worker threads: nothing on the
  event loop waits for a load except the requests that need that model.
- Room: at most ``max_models`` models are loaded or being loaded, and, with ``memory_budget_bytes``,
  their weight bytes (estimated before a load, measured after it) fit the budget. To make room, the
  least recently used model **with no request in flight or waiting** is unloaded (and its memory
  released) before the new load starts; a model in use is never unloaded. When no model can be
  unloaded, the load waits until one becomes idle.
- A request waits at most ``load_timeout_s`` for its model (load, or room to load it): then it gets
  :class:`~app.errors.ModelLoading` (503, Retry-After) while the load goes on. A load that fails raises
  :class:`~app.errors.ModelLoadFailed` (a clear message, no traceback) to every request waiting for it,
  is not kept, and the next request tries again; the other models are not touched.
- Counters per model (loads, load failures, evictions, load seconds, requests) in :meth:`stats`, log
  lines naming the model for each load, failure and eviction, and the same events told to an injected
  :class:`PoolObserver` (metrics).

Loader (injected): ``prepare(spec) -> (prepared, estimated_bytes)`` fetches or resolves the weights and
estimates their size (worker thread); ``load(spec, prepared) -> (engine, weight_bytes)`` builds the
engine (worker thread); ``async unload(engine)`` stops the engine and releases its memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from app.errors import ModelLoadFailed, ModelLoading, ServingError

logger = logging.getLogger(__name__)


class Loader(Protocol):
    def prepare(self, spec: Any) -> tuple[Any, int]: ...

    def load(self, spec: Any, prepared: Any) -> tuple[Any, int]: ...

    async def unload(self, engine: Any) -> None: ...


class PoolObserver(Protocol):
    """Told of each load (with its seconds), failed load and eviction, for metrics
    (``deployments/metrics.py`` PoolMetrics); called on the pool's event loop, must not raise."""

    def loaded(self, model: str, seconds: float) -> None: ...

    def load_failed(self, model: str) -> None: ...

    def evicted(self, model: str) -> None: ...


class _NullPoolObserver:
    def loaded(self, model: str, seconds: float) -> None:
        pass

    def load_failed(self, model: str) -> None:
        pass

    def evicted(self, model: str) -> None:
        pass


@dataclass
class ModelCounters:
    """What happened to one model on this replica (for stats, logs and the metrics exporter)."""

    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    load_seconds: float = 0.0  # fetching and loading (prepare + load), not waiting for room
    requests: int = 0


@dataclass(eq=False)
class _Entry:
    spec: Any
    task: asyncio.Task | None = None
    engine: Any = None
    loaded: bool = False
    placed: bool = False  # holds one of the max_models places (and its bytes count against the budget)
    users: int = 0  # requests holding it or waiting for it: while > 0 it is never unloaded
    last_used: float = field(default_factory=time.monotonic)
    bytes: int = 0

    @property
    def state(self) -> str:
        return "loaded" if self.loaded else "loading"


class ModelPool:
    """See the module docstring. Use from one event loop."""

    def __init__(self, loader: Loader, *, max_models: int, memory_budget_bytes: int | None = None,
                 load_timeout_s: float = 300.0, on_change: Callable[[], None] | None = None,
                 log: logging.Logger = logger, observer: PoolObserver | None = None) -> None:
        self.loader = loader
        self.log = log
        self.observer = observer or _NullPoolObserver()
        self.max_models = max_models
        self.memory_budget_bytes = memory_budget_bytes
        self.load_timeout_s = load_timeout_s
        self._on_change = on_change or (lambda: None)
        self._entries: dict[str, _Entry] = {}
        self._freed = asyncio.Event()  # set whenever a place or bytes may have become free
        self._unloading_bytes = 0
        self._executor = ThreadPoolExecutor(max_workers=max_models + 1, thread_name_prefix="load")
        self.counters: dict[str, ModelCounters] = {}

    # --- requests ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, spec: Any) -> AsyncIterator[Any]:
        """The loaded engine of ``spec.id``, held (never unloaded) until the block exits."""
        entry = await self._acquire(spec)
        try:
            yield entry.engine
        finally:
            self._release(entry)

    async def _acquire(self, spec: Any) -> _Entry:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout_s
        self._counters(spec.id).requests += 1
        while True:
            entry = self._entries.get(spec.id)
            if entry is None:
                entry = self._entries[spec.id] = _Entry(spec)
                entry.task = loop.create_task(self._load(entry, deadline))
                entry.task.add_done_callback(_retrieve)
                self._on_change()
            entry.users += 1
            if entry.loaded:
                entry.last_used = time.monotonic()
                return entry
            try:
                await asyncio.wait_for(asyncio.shield(entry.task), max(0.0, deadline - loop.time()))
            except TimeoutError:
                self._release(entry)
                raise ModelLoading(f"The model '{spec.id}' is still being loaded (waited "
                                   f"{self.load_timeout_s:g} s); retry shortly.") from None
            except BaseException:
                self._release(entry)
                raise
            if entry.loaded and self._entries.get(spec.id) is entry:
                entry.last_used = time.monotonic()
                return entry
            self._release(entry)  # unloaded between its load and this wake-up: cannot happen while
            # users > 0, but never hand out a closed engine

    def _release(self, entry: _Entry) -> None:
        entry.users -= 1
        entry.last_used = time.monotonic()
        if entry.users == 0:
            self._freed.set()

    # --- loading and eviction ---------------------------------------------------------------------

    async def _load(self, entry: _Entry, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        model_id, started = entry.spec.id, time.monotonic()
        counters = self._counters(model_id)
        try:
            prepared, entry.bytes = await loop.run_in_executor(self._executor, self.loader.prepare, entry.spec)
            working = time.monotonic() - started  # load seconds count fetching and loading, not waiting
            if self.memory_budget_bytes is not None and entry.bytes > self.memory_budget_bytes:
                raise ModelLoadFailed(f"The model '{model_id}' needs about {entry.bytes} bytes, more than this "
                                      f"server's per-replica memory budget ({self.memory_budget_bytes}).",
                                      param="model", code="model_too_large")
            await self._make_room(entry, deadline)
            self.log.info("loading model %s (about %d bytes)", model_id, entry.bytes)
            loading = time.monotonic()
            engine, size = await loop.run_in_executor(self._executor, self.loader.load, entry.spec, prepared)
            entry.engine, entry.bytes, entry.loaded = engine, size, True
            seconds = working + time.monotonic() - loading
            counters.loads += 1
            counters.load_seconds += seconds
            self.observer.loaded(model_id, seconds)
            self.log.info("loaded model %s in %.2f s (%d bytes)", model_id, seconds, size)
        except BaseException as exc:
            counters.load_failures += 1
            self.observer.load_failed(model_id)
            if self._entries.get(model_id) is entry:
                del self._entries[model_id]
            self._freed.set()
            self.log.warning("loading model %s failed: %s: %s", model_id, type(exc).__name__, exc)
            if isinstance(exc, (ServingError, asyncio.CancelledError)):
                raise
            raise ModelLoadFailed(f"The model '{model_id}' could not be loaded: {type(exc).__name__}: "
                                  f"{str(exc)[:300]}", param="model") from None
        finally:
            self._on_change()

    def _fits(self, entry: _Entry) -> bool:
        placed = [e for e in self._entries.values() if e.placed and e is not entry]
        if len(placed) + 1 > self.max_models:
            return False
        if self.memory_budget_bytes is None:
            return True
        used = sum(e.bytes for e in placed) + self._unloading_bytes
        return used + entry.bytes <= self.memory_budget_bytes

    async def _make_room(self, entry: _Entry, deadline: float) -> None:
        """Unload idle models, least recently used first, until ``entry`` fits; wait while none is idle."""
        loop = asyncio.get_running_loop()
        while not self._fits(entry):
            idle = [e for e in self._entries.values() if e.loaded and e.users == 0 and e is not entry]
            if idle:
                await self._evict(min(idle, key=lambda e: e.last_used))
                continue
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ModelLoading(f"No room to load the model '{entry.spec.id}': every loaded model is "
                                   "serving requests; retry shortly.") from None
        entry.placed = True

    async def _evict(self, entry: _Entry) -> None:
        model_id = entry.spec.id
        del self._entries[model_id]  # synchronously: no request can pick it up from here on
        engine, entry.engine = entry.engine, None
        self._unloading_bytes += entry.bytes
        self._counters(model_id).evictions += 1
        self.observer.evicted(model_id)
        self._on_change()
        self.log.info("evicting model %s (least recently used, idle; %d bytes)", model_id, entry.bytes)
        try:
            await self.loader.unload(engine)
        except Exception:
            self.log.exception("unloading model %s failed", model_id)
        finally:
            self._unloading_bytes -= entry.bytes
            self._freed.set()

    async def evict_idle(self) -> list[str]:
        """Unload every loaded model that has no request in flight; return their ids (for operators)."""
        idle = sorted((e for e in self._entries.values() if e.loaded and e.users == 0),
                      key=lambda e: e.last_used)
        for entry in idle:
            if self._entries.get(entry.spec.id) is entry and entry.users == 0:
                await self._evict(entry)
        return [e.spec.id for e in idle]

    # --- reporting --------------------------------------------------------------------------------

    def _counters(self, model_id: str) -> ModelCounters:
        return self.counters.setdefault(model_id, ModelCounters())

    def engines(self) -> dict[str, Any]:
        """``{model id: engine}`` of the loaded models. Safe from another thread (the metrics sampler):
        ``list`` copies the entries in one step under the GIL while the event loop may change them."""
        return {model_id: e.engine for model_id, e in list(self._entries.items()) if e.loaded and e.engine is not None}

    def states(self) -> dict[str, str]:
        """``{model id: "loaded" | "loading"}`` for every model this pool holds or is loading."""
        return {model_id: e.state for model_id, e in self._entries.items()}

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "max_models": self.max_models, "memory_budget_bytes": self.memory_budget_bytes,
            "loaded_bytes": sum(e.bytes for e in self._entries.values() if e.loaded),
            "models": {model_id: {"state": e.state, "in_flight": e.users, "bytes": e.bytes,
                                  "idle_s": round(now - e.last_used, 3)}
                       for model_id, e in self._entries.items()},
            "lru_order": [e.spec.id for e in sorted(self._entries.values(), key=lambda e: e.last_used)],
            "counters": {model_id: vars(c).copy() for model_id, c in self.counters.items()},
        }

    async def close(self) -> None:
        for entry in list(self._entries.values()):
            if entry.loaded:
                self._entries.pop(entry.spec.id, None)
                await self.loader.unload(entry.engine)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retrieve(task: asyncio.Task) -> None:
    """Mark a load task's exception as seen (its waiters may all have timed out)."""
    if not task.cancelled():
        task.exception()
