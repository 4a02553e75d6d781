"""Which models can serve right now: the ingress's per-model availability view.

Ray Serve queues a request for a deployment that has no running replica until one appears: a model whose
replicas fail to load (Ray retries, then marks it DEPLOY_FAILED), a model still starting, or one whose only
replica died all leave callers waiting, up to the 300 s request deadline (measured on Ray 2.60: a request
queued for a model that then failed to deploy still waited for its deadline). This module turns those
cases into a prompt 503 ``model_unavailable`` naming the reason:

- :class:`Availability` refreshes, every ``interval_s`` (1 s) on the ingress's event loop, a
  :class:`ModelState` per model from Ray Serve's own view (``serve.status()``: the deployment's status,
  message and replica counts), read on a thread of its own (one controller call, about 1 ms of CPU);
- :meth:`Availability.check` refuses a request to a model that has no running replica before anything
  is sent to it;
- :meth:`Availability.guard` wraps a request's records: while the first record has not arrived, the
  request is abandoned (cancelled upstream) with the same 503 as soon as the view says the model lost
  its replicas, so a request queued when the last replica went away does not wait for its deadline.

A model with at least one running replica is ready, whatever else Ray reports (a failed rolling update
keeps the old replicas serving). Until the first refresh (or if the controller cannot be read), the view
is unknown and requests go through as before.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Callable, Mapping

from app.errors import ModelUnavailable

logger = logging.getLogger(__name__)

READY, STARTING, UNAVAILABLE = "ready", "starting", "unavailable"
# Ray deployment statuses that mean "not coming back by itself" (with no replica running).
_FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}
# Replica states of a live replica that serves, or will again as soon as an in-place change ends: Ray
# marks a replica UPDATING while its reconfigure (a live user_config) runs, and its router holds
# requests meanwhile instead of failing them.
_LIVE = ("RUNNING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 500


@dataclass(frozen=True)
class ModelState:
    """A model's readiness as Ray Serve reports its deployment."""

    state: str  # ready | starting | unavailable
    deployment: str
    status: str | None  # Ray's deployment status (HEALTHY, UPDATING, DEPLOY_FAILED, ...); None if unknown
    running_replicas: int  # live replicas: RUNNING, or UPDATING/RECOVERING/PENDING_MIGRATION in place
    reason: str | None  # Ray's current message, shortened (summary + the exception line, no traceback)
    # The exception of the latest failed replica start since the model was last ready: Ray's message
    # moves on (e.g. to "taken more than 30s to initialize" for the next attempt), this stays.
    last_failure: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        what = f"deployment '{self.deployment}' has no running replica ({self.state})"
        if self.reason:
            what += f": {self.reason.rstrip('.')}"
        if self.last_failure and self.last_failure not in (self.reason or ""):
            what += f"; last failure: {self.last_failure.rstrip('.')}"
        return what


def model_state(deployment: str, overview: Any | None, last_failure: str | None = None) -> ModelState:
    """Classify one deployment from its ``serve.status()`` overview (None: not known to Ray yet);
    ``last_failure`` is the previous state's, kept unless this message names a newer one."""
    if overview is None:
        return ModelState(STARTING, deployment, None, 0, None, last_failure)
    status = _value(overview.status)
    counts = dict(overview.replica_states)
    running = sum(int(counts.get(state, 0)) for state in _LIVE)
    if running > 0:
        return ModelState(READY, deployment, status, running, None)
    state = UNAVAILABLE if status in _FAILED else STARTING
    return ModelState(state, deployment, status, 0, short_reason(overview.message),
                      exception_line(overview.message) or last_failure)


def short_reason(message: str | None) -> str | None:
    """Ray's deployment message without its traceback: the summary's first sentence and the exception
    line, e.g. ``A replica failed to start with exception: SourceError: model directory '/x' does not
    exist``."""
    text = _ANSI.sub("", message or "").strip()
    if not text:
        return None
    head, sep, _ = text.partition("Error:\n")
    head = " ".join(head.split())
    if sep:
        first = head.split(". ")[0].rstrip(".")
        exc = exception_line(text)
        text = f"{first}: {exc}" if exc else first
    else:
        text = head
    return _cap(text)


def exception_line(message: str | None) -> str | None:
    """The exception a Ray message's ``Error:`` traceback ends with (``SourceError: ...``), else None."""
    _, sep, error = _ANSI.sub("", message or "").partition("Error:\n")
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if not sep or not lines:
        return None
    name, colon, rest = lines[-1].partition(":")
    if colon and re.fullmatch(r"[A-Za-z_][\w.]*", name):
        return _cap(name.rsplit(".", 1)[-1] + colon + rest)  # without the exception class's module path
    return _cap(lines[-1])


def _cap(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 1] + "…"


@dataclass(frozen=True)
class Overview:
    """What :func:`model_state` reads of a deployment: the fields of Ray's ``DeploymentStatusOverview``."""

    status: str
    replica_states: dict[str, int]  # replica state -> count
    message: str


def read_serve_status(app_name: str) -> dict[str, Any]:
    """``{deployment name: overview}`` of application ``app_name``: one controller call (blocking).

    Reads the controller's details as the plain dict it sends: ``serve.status()`` turns the same dict into
    pydantic models first, whose validation cloudpickles every deployment's request-router class, about
    20 ms of the ingress's CPU per call against about 1 ms here (measured on Ray 2.60), once a second for
    as long as the ingress runs. Falls back to ``serve.status()`` if the dict is not the shape expected.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    try:
        app = client.get_serve_details().get("applications", {}).get(app_name)
        if app is None:
            return {}
        return {name: Overview(_value(d["status"]), dict(Counter(_value(r["state"]) for r in d["replicas"])),
                               d.get("message") or "")
                for name, d in app["deployments"].items()}
    except (AttributeError, KeyError, TypeError):  # another Ray's layout: the public API's view
        from ray import serve

        status = serve.status().applications.get(app_name)
        return dict(status.deployments) if status is not None else {}


def _value(field: Any) -> str:
    """A Ray status enum (or its string) as its string value."""
    return str(getattr(field, "value", field))


class Availability:
    """The per-model view (see the module docstring). ``deployments`` maps model id -> deployment name;
    ``fetch`` returns ``{deployment name: overview}`` and is called on a thread of its own."""

    def __init__(self, deployments: Mapping[str, str], fetch: Callable[[], Mapping[str, Any]], *,
                 interval_s: float = 1.0) -> None:
        self._deployments = dict(deployments)
        self._fetch = fetch
        self.interval_s = interval_s
        self._states: dict[str, ModelState] | None = None  # None until the first successful refresh
        self._lost: dict[str, asyncio.Event] = {m: asyncio.Event() for m in self._deployments}
        self._first = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False
        self._rereading: asyncio.Future | None = None  # check()'s re-read of a not-ready view
        # Its own thread: the read blocks (a controller call) and must not take a worker from the loop's
        # default pool, which request handlers use; one read is in flight at a time.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="availability")

    def start(self) -> None:
        """Start the refresh loop on the running event loop (idempotent; no-op outside a loop)."""
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._run(), name="availability")

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop the refreshes
                logger.exception("availability refresh failed")
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> None:
        """Read Ray's view once and update every model's state; a failed read keeps the last view."""
        try:
            overviews = await asyncio.get_running_loop().run_in_executor(self._reader, self._fetch)
        except Exception as exc:  # the controller is restarting or unreachable: keep what we knew
            if not self._failing:
                logger.warning("cannot read Serve's deployment statuses, keeping the last view: %r", exc)
            self._failing = True
            return
        self._failing = False
        previous = self._states or {}
        states = {m: model_state(d, overviews.get(d), getattr(previous.get(m), "last_failure", None))
                  for m, d in self._deployments.items()}
        for model, state in states.items():
            if state.ready:
                self._lost[model].clear()
            else:
                self._lost[model].set()
        for model, state in states.items():
            if state.state != getattr(previous.get(model), "state", None):
                if state.ready:
                    logger.info("model %s is ready (%d replicas)", model, state.running_replicas)
                else:
                    logger.warning("model %s is not ready: %s", model, state.describe())
        self._states = states
        self._first.set()

    def state(self, model: str) -> ModelState | None:
        """The model's last known state; None while unknown."""
        return None if self._states is None else self._states.get(model)

    async def snapshot(self, wait_s: float = 3.0) -> dict[str, ModelState | None]:
        """Every model's state, waiting up to ``wait_s`` for the first refresh."""
        self.start()
        if not self._first.is_set():
            try:
                await asyncio.wait_for(self._first.wait(), wait_s)
            except TimeoutError:
                pass
        return {m: self.state(m) for m in self._deployments}

    async def check(self, model: str) -> None:
        """Raise ModelUnavailable (503) when the model has no running replica. A view that says so is
        read again first (one read shared by concurrent callers), so a model that came up since the
        last refresh is never refused on a stale view; the common, ready path costs nothing."""
        self.start()
        state = self.state(model)
        if state is None or state.ready:
            return
        if self._rereading is None or self._rereading.done():
            self._rereading = asyncio.ensure_future(self.refresh())
        await asyncio.shield(self._rereading)
        state = self.state(model)
        if state is not None and not state.ready:
            raise unavailable(model, state)

    async def guard(self, model: str, records: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``records``, but while the first one is awaited, give up with ModelUnavailable as soon as the
        model has no running replica; closing this closes ``records`` (which cancels the request)."""
        try:
            first = asyncio.ensure_future(anext(records))
            lost = asyncio.ensure_future(self._lost[model].wait())
            try:
                await asyncio.wait({first, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not first.done():
                    first.cancel()
                    await asyncio.gather(first, return_exceptions=True)
            if first.cancelled():
                state = self.state(model)
                raise unavailable(model, state) if state is not None else ModelUnavailable(
                    f"The model '{model}' has no running replica; retry shortly.", param="model")
            try:
                item = first.result()
            except StopAsyncIteration:
                return
            yield item
            async for item in records:
                yield item
        finally:
            await records.aclose()


def unavailable(model: str, state: ModelState) -> ModelUnavailable:
    return ModelUnavailable(f"The model '{model}' cannot serve requests now: {state.describe()}. Retry "
                            "shortly; GET /health shows every model's state.", param="model")
