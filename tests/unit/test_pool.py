"""ModelPool alone (fake loader, no Ray, no torch): load once, parallel loads, LRU eviction that never
touches a model in use, failures that are not cached, load timeout, memory budget."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from app.errors import ModelLoadFailed, ModelLoading
from deployments.pool import ModelPool


def spec(name):
    return SimpleNamespace(id=name)


class FakeLoader:
    """Loads 'engines' (plain objects) in worker threads; records what happened, in order."""

    def __init__(self, *, delay=0.0, sizes=None, fail=(), gates=None):
        self.delay, self.sizes, self.fail = delay, sizes or {}, set(fail)
        self.gates = gates or {}  # model id -> threading.Event the load waits for
        self.events: list[tuple[str, str]] = []
        self.loading_now = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def prepare(self, s):
        return s.id, self.sizes.get(s.id, 10)

    def load(self, s, prepared):
        with self._lock:
            self.loading_now += 1
            self.most_at_once = max(self.most_at_once, self.loading_now)
        try:
            self.events.append(("load", s.id))
            if s.id in self.gates:
                assert self.gates[s.id].wait(10)
            time.sleep(self.delay)
            if s.id in self.fail:
                raise OSError(f"no weights in /models/{s.id}")
            return SimpleNamespace(id=s.id, closed=False), self.sizes.get(s.id, 10)
        finally:
            with self._lock:
                self.loading_now -= 1

    async def unload(self, engine):
        engine.closed = True
        self.events.append(("unload", engine.id))

    def count(self, kind, model):
        return self.events.count((kind, model))


async def ask(pool, name):
    async with pool.use(spec(name)) as engine:
        assert not engine.closed
        return engine


async def test_concurrent_first_requests_load_once():
    loader = FakeLoader(delay=0.2)
    pool = ModelPool(loader, max_models=2)
    engines = await asyncio.gather(*(ask(pool, "a") for _ in range(20)))
    assert loader.count("load", "a") == 1 and len({id(e) for e in engines}) == 1
    assert pool.stats()["counters"]["a"]["loads"] == 1
    assert pool.stats()["counters"]["a"]["requests"] == 20


async def test_different_models_load_in_parallel_off_the_event_loop():
    gates = {"a": threading.Event(), "b": threading.Event()}
    loader = FakeLoader(gates=gates)
    pool = ModelPool(loader, max_models=2)
    both = asyncio.gather(ask(pool, "a"), ask(pool, "b"))
    # The event loop keeps running while both loads are under way in worker threads.
    for _ in range(200):
        if loader.loading_now == 2:
            break
        await asyncio.sleep(0.01)
    assert loader.loading_now == 2 and pool.states() == {"a": "loading", "b": "loading"}
    gates["a"].set(), gates["b"].set()
    await both
    assert loader.most_at_once == 2 and pool.states() == {"a": "loaded", "b": "loaded"}


async def test_lru_eviction_by_name_and_reload():
    loader = FakeLoader()
    pool = ModelPool(loader, max_models=2)
    await ask(pool, "a")
    await ask(pool, "b")
    await ask(pool, "a")  # a is now more recent than b
    await ask(pool, "c")  # evicts b, the least recently used
    assert set(pool.states()) == {"a", "c"} and loader.count("unload", "b") == 1
    await ask(pool, "b")  # evicts a
    assert set(pool.states()) == {"b", "c"} and loader.count("unload", "a") == 1
    assert loader.count("load", "b") == 2  # reloaded
    counters = pool.stats()["counters"]
    assert counters["b"]["loads"] == 2 and counters["b"]["evictions"] == 1 and counters["a"]["evictions"] == 1


async def test_a_model_in_use_is_never_evicted():
    loader = FakeLoader()
    pool = ModelPool(loader, max_models=2)
    release = asyncio.Event()

    async def long_stream():
        async with pool.use(spec("a")) as engine:
            await release.wait()
            assert not engine.closed  # still loaded at the end of the stream
            return engine

    stream = asyncio.create_task(long_stream())
    while pool.states().get("a") != "loaded":
        await asyncio.sleep(0.01)
    await ask(pool, "b")
    # a was used before b (LRU), but it is serving: the burst for b and c evicts b, never a.
    for name in ["c", "b", "c", "b"]:
        await ask(pool, name)
    assert loader.count("unload", "a") == 0
    release.set()
    await stream
    # a's stream ended last, so a is now the most recently used: d evicts b, the older idle model.
    await ask(pool, "d")
    assert set(pool.states()) == {"a", "d"} and loader.count("unload", "a") == 0


async def held(pool, name):
    """A task that holds model ``name`` in use until the returned event is set (once it is loaded)."""
    release = asyncio.Event()

    async def hold():
        async with pool.use(spec(name)):
            await release.wait()

    holder = asyncio.create_task(hold())
    while pool.states().get(name) != "loaded":
        await asyncio.sleep(0.01)
    return holder, release


async def test_load_waits_for_room_while_every_model_is_in_use():
    loader = FakeLoader()
    pool = ModelPool(loader, max_models=1, load_timeout_s=5)
    holder, release = await held(pool, "a")
    waiting = asyncio.create_task(ask(pool, "b"))
    await asyncio.sleep(0.2)
    assert not waiting.done() and loader.count("unload", "a") == 0
    release.set()
    await holder
    await waiting
    assert pool.states() == {"b": "loaded"} and loader.count("unload", "a") == 1


async def test_no_room_within_the_timeout_is_a_503_with_retry_after():
    loader = FakeLoader()
    pool = ModelPool(loader, max_models=1, load_timeout_s=0.3)
    holder, release = await held(pool, "a")
    with pytest.raises(ModelLoading) as err:
        await ask(pool, "b")
    assert err.value.status_code == 503 and "Retry-After" in err.value.headers
    release.set()
    await holder
    await ask(pool, "b")  # room now


async def test_slow_load_times_out_the_request_but_goes_on():
    gate = threading.Event()
    loader = FakeLoader(gates={"a": gate})
    pool = ModelPool(loader, max_models=2, load_timeout_s=0.2)
    with pytest.raises(ModelLoading) as err:
        await ask(pool, "a")
    assert err.value.headers["Retry-After"]
    assert pool.states() == {"a": "loading"}
    gate.set()
    while pool.states().get("a") != "loaded":
        await asyncio.sleep(0.01)
    await ask(pool, "a")
    assert loader.count("load", "a") == 1


async def test_failed_load_is_clear_not_cached_retried_and_isolated():
    loader = FakeLoader(fail={"broken"})
    pool = ModelPool(loader, max_models=2)
    await ask(pool, "good")
    results = await asyncio.gather(*(ask(pool, "broken") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ModelLoadFailed) for r in results)
    assert "broken" in results[0].message and "OSError" in results[0].message
    assert "Traceback" not in results[0].message
    assert loader.count("load", "broken") == 1 and "broken" not in pool.states()
    with pytest.raises(ModelLoadFailed):
        await ask(pool, "broken")
    assert loader.count("load", "broken") == 2  # retried, not cached
    loader.fail.clear()
    await ask(pool, "broken")
    assert pool.states() == {"good": "loaded", "broken": "loaded"} and loader.count("unload", "good") == 0
    assert pool.stats()["counters"]["broken"]["load_failures"] == 2


async def test_memory_budget_decides_what_fits():
    loader = FakeLoader(sizes={"a": 60, "b": 60, "c": 30, "huge": 500})
    pool = ModelPool(loader, max_models=3, memory_budget_bytes=100)
    await ask(pool, "a")
    await ask(pool, "b")  # 60 + 60 > 100: a goes although the count would allow 3
    assert set(pool.states()) == {"b"}
    await ask(pool, "c")  # 60 + 30 fits
    assert set(pool.states()) == {"b", "c"} and pool.stats()["loaded_bytes"] == 90
    with pytest.raises(ModelLoadFailed) as err:
        await ask(pool, "huge")
    assert err.value.code == "model_too_large" and set(pool.states()) == {"b", "c"}
