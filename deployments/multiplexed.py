"""The multiplexed chat deployment: every allowed model that is not pinned, loaded on demand.

The ingress calls ``chat`` with ``handle.options(multiplexed_model_id=model)``, so Ray Serve routes a
request to a replica that already holds (or is loading) that model when there is one, else to a
replica holding the fewest models. A replica keeps its models in a :class:`~deployments.pool.ModelPool`
(load once, loads of different models in parallel in worker threads, least recently used *idle* model
evicted, never one with a request in flight, optional memory budget, load timeout; see its contract).
Each model has its own continuous-batching engine, so a batch never mixes models; requests go to their
model's engine directly (``engine.submit``): the engine batches whatever waits at each step, so a
``@serve.batch`` queue in front of it would add only latency.

Why the pool and not Ray's ``@serve.multiplexed`` cache: Ray's cache (ray/serve/multiplex.py) loads
behind one lock per replica, evicts by count whatever is still streaming from the evicted model, and
holds the model object itself. We keep Ray's decorator for what it does well, telling the routers which
replica holds which model: ``_route_here`` is decorated with ``@serve.multiplexed(max_num_models_per_
replica=-1)`` (Ray never evicts), returns at once (Ray's lock is held for microseconds), and is called
for every request, which registers the model id with Ray (Ray pushes the ids to the routers every
0.1 s). When the pool evicts a model or fails to load it, :meth:`_sync_routing` removes the id from
Ray's cache and asks it to push again, so the routers' view stays the pool's view. That touches two
private attributes of Ray's wrapper (``models``, ``_push_multiplexed_replica_info``), guarded so that a
Ray change degrades routing (a request may land on a replica that must load the model) rather than
serving. ``max_models_per_replica`` is our pool's bound, not Ray's.

:class:`ModelDirectory` (one small replica) collects every replica's ``{model: loaded|loading}`` so
``/v1/models`` can say where models are loaded; replicas report on every change and at each health check,
and a replica not heard from for ``DIRECTORY_TTL_S`` drops out.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from ray import serve

from app.allowlist import checked_source, resolve_allowed
from app.config import ChatModelSpec, OnDemandSpec
from app.errors import ModelNotFound
from app.protocol.sampling import SamplingRequest
from app.streaming import Served
from deployments.engines.prepared import merged
from deployments.engines.preparers import prepare
from deployments.logs import install_client_error_filter
from deployments.metrics import PoolMetrics, observe, timed, watch_engines
from deployments.pool import ModelPool

logger = logging.getLogger(__name__)

DIRECTORY_TTL_S = 30.0


class ChatLoader:
    """The pool's loader for chat models: the allow-list is checked again, a models_root name must
    resolve inside the root, then the checkpoint is fetched (prepare) and loaded (load) in worker
    threads; unload waits for the engine to drop cancelled rows, then closes it off the event loop."""

    def __init__(self, on_demand: OnDemandSpec) -> None:
        self.on_demand = on_demand
        # torch and transformers are imported when the replica starts (seconds), not by the first request.
        self._models = importlib.import_module("deployments.models.loader")
        self._models.import_model_code()

    def prepare(self, spec: ChatModelSpec) -> tuple[Any, int]:
        source = checked_source(self.on_demand, spec.id)
        return self._models.prepare_chat(spec.model_copy(update={"source": source}))

    def load(self, spec: ChatModelSpec, prepared: Any) -> tuple[Any, int]:
        engine, size = self._models.load_prepared_chat(spec, prepared)
        return observe(spec.id, engine), size

    async def unload(self, engine: Any) -> None:
        for _ in range(200):  # a cancelled request's rows leave the batch at the engine's next step
            stats = engine.stats()
            if not stats.get("running_rows") and not stats.get("waiting_groups"):
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.close)


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        return "local"


@serve.deployment(ray_actor_options={"num_cpus": 1})
class MultiplexedChatDeployment:
    """Chat models loaded on demand (see the module docstring). ``chat`` streams like
    :class:`~deployments.llm.LLMDeployment`'s, with :class:`Served` first in its first list."""

    def __init__(self, on_demand: OnDemandSpec, directory: Any = None, loader: Any = None) -> None:
        install_client_error_filter()  # a 4xx raised to the caller is logged as one INFO line
        self.on_demand = on_demand
        self.replica_id = replica_id()
        self._directory = directory
        self.pool = ModelPool(loader or ChatLoader(on_demand), max_models=on_demand.max_models_per_replica,
                              memory_budget_bytes=on_demand.memory_budget_bytes,
                              load_timeout_s=on_demand.load_timeout_s, on_change=self._changed,
                              log=logging.getLogger("ray.serve"),  # Serve's replica log, request ids included
                              observer=PoolMetrics())
        if self.replica_id != "local":  # in a replica (not a unit test): export the engines' gauges
            watch_engines(self.pool.engines)
        # One thread for chat templates and tokenization (of every model here): tokenizers are not
        # shared between threads, and each prompt is bounded by its model's context.
        self._preprocess = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess")

    @timed
    async def generate(self, request: SamplingRequest) -> AsyncIterator[list[Any]]:
        """Stream the deltas of one generation request for the model Ray routed it with."""
        spec = self._routed_spec(request.model)
        await self._route_here(spec.id)
        async with self.pool.use(spec) as engine:
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._preprocess, prepare, request, engine, spec.limits)
            served: list[Any] = [Served(self.replica_id, spec.id)]
            # merged() cancels the rows when the caller goes away.
            async for deltas in merged(prepared, engine.submit(prepared.requests)):
                yield served + deltas
                served = []

    @timed
    async def tokenize(self, request: Any) -> AsyncIterator[list[Any]]:
        """``/tokenize`` and ``/detokenize`` for the routed model (see LLMDeployment.tokenize)."""
        from deployments.engines.tokenize import run_tokenizer

        spec = self._routed_spec(request.model)
        await self._route_here(spec.id)
        async with self.pool.use(spec) as engine:
            result = await asyncio.get_running_loop().run_in_executor(self._preprocess, run_tokenizer,
                                                                      request, engine, spec.limits, None)
        yield [Served(self.replica_id, spec.id), result]

    async def prompt_limits(self) -> dict[str, int]:
        """The routed model's prompt limits (see LLMDeployment.prompt_limits); loads it if need be."""
        from deployments.engines.chat_params import prompt_limits

        async with self.pool.use(self._routed_spec()) as engine:
            return await asyncio.to_thread(prompt_limits, engine)

    def _routed_spec(self, requested: str | None = None) -> ChatModelSpec:
        """The allowed spec of the model Ray routed this call with (and, if given, the one the body
        names: they must agree); ModelNotFound otherwise."""
        model_id = serve.get_multiplexed_model_id() or requested
        spec = resolve_allowed(self.on_demand, model_id) if model_id else None  # never trust a path
        if spec is None or (requested is not None and model_id != requested):
            raise ModelNotFound(str(model_id))
        return spec

    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _route_here(self, model_id: str) -> str:
        """Registers ``model_id`` with Ray's routing (see the module docstring); loads nothing."""
        return model_id

    def _changed(self) -> None:
        self._sync_routing()
        self._report()

    def _sync_routing(self) -> None:
        """Drop from Ray's multiplex registry the ids this pool no longer holds or loads."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is None:
            return
        try:
            held = self.pool.states()
            for model_id in [m for m in wrapper.models if m not in held]:
                wrapper.models.pop(model_id, None)
                wrapper.registered_model_gauge.set(0, tags={"model_id": model_id})
                wrapper._push_multiplexed_replica_info = True
        except Exception:  # Ray changed its wrapper: routing may send a request to load a model again
            logger.warning("could not update Ray's multiplexed model ids", exc_info=True)

    def _report(self) -> None:
        if self._directory is not None:
            try:
                self._directory.report.remote(self.replica_id, self.pool.states())
            except Exception:
                logger.warning("could not report models to the directory", exc_info=True)

    def stats(self) -> dict[str, Any]:
        """The pool (models, states, LRU order, per-model counters), this replica and its memory."""
        return {"replica_id": self.replica_id, "rss_bytes": resident_bytes(), **self.pool.stats(),
                "engines": {m: engine.stats() for m, engine in self.pool.engines().items()}}

    async def evict_idle(self) -> list[str]:
        """Unload every model with no request in flight (operators, tests)."""
        return await self.pool.evict_idle()

    async def check_health(self) -> None:
        """Ray's replica health check; also refreshes this replica's entry in the directory."""
        self._report()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ModelDirectory:
    """Which on-demand models are loaded or loading on which replica, for ``/v1/models``."""

    def __init__(self) -> None:
        self._replicas: dict[str, tuple[float, dict[str, str]]] = {}

    def report(self, replica: str, states: dict[str, str]) -> None:
        self._replicas[replica] = (time.monotonic(), dict(states))

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{model: {"loaded": replicas, "loading": replicas}}`` over replicas heard from lately."""
        now, out = time.monotonic(), {}
        for replica, (seen, states) in list(self._replicas.items()):
            if now - seen > DIRECTORY_TTL_S:
                del self._replicas[replica]
                continue
            for model, state in states.items():
                counts = out.setdefault(model, {"loaded": 0, "loading": 0})
                counts[state] += 1
        return out

