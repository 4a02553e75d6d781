"""The ingress's availability view, fed with Ray-shaped deployment overviews (no Ray here)."""

import asyncio
from types import SimpleNamespace

import pytest

from app.availability import Availability, model_state, short_reason
from app.errors import ModelUnavailable

# The shape of Ray 2.60's message for a replica whose constructor raised (ANSI codes included).
LOAD_FAILED = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor "
    "or initial health check failing. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:openai:broken.initialize_and_get_metadata()\x1b[39m (pid=1, ip=10.0.0.1)\n"
    '  File "/srv/deployments/models/sources.py", line 36, in resolve_source\n'
    "    raise SourceError(f\"model directory {source!r} does not exist\")\n"
    "deployments.models.sources.SourceError: model directory '/nope' does not exist\n")


def overview(status, running=0, message="", **states):
    return SimpleNamespace(status=status, replica_states={"RUNNING": running, **states} if running
                           else dict(states), message=message)


def test_states_follow_running_replicas_and_ray_status():
    assert model_state("d", overview("HEALTHY", 1)).ready
    # A replica applying a live user_config (Ray: UPDATING) still serves once it is done.
    assert model_state("d", overview("UPDATING", 0, "", UPDATING=1)).ready
    # A failed rolling update keeps the old replica serving: still ready.
    assert model_state("d", overview("DEPLOY_FAILED", 1, "boom")).ready
    failed = model_state("d", overview("DEPLOY_FAILED", 0, LOAD_FAILED))
    assert (failed.state, failed.running_replicas) == ("unavailable", 0)
    assert failed.reason == ("The deployment failed to start 3 times in a row: SourceError: model "
                             "directory '/nope' does not exist")
    starting = model_state("d", overview("UPDATING", 0, "", STARTING=1))
    assert (starting.state, starting.reason) == ("starting", None)
    assert model_state("d", None).state == "starting"  # not created by the controller yet


def test_reason_has_no_traceback_or_escape_codes():
    reason = short_reason(LOAD_FAILED.replace("The deployment failed to start 3 times in a row",
                                              "A replica failed to start with exception. Retrying 2 more "
                                              "time(s)"))
    assert reason == ("A replica failed to start with exception: SourceError: model directory '/nope' "
                      "does not exist")
    assert short_reason("Deployment 'x' has 1 replicas that have taken more than 30s to initialize.\n"
                        "This may be caused by a slow __init__.") == (
        "Deployment 'x' has 1 replicas that have taken more than 30s to initialize. This may be caused by "
        "a slow __init__.")
    assert short_reason("") is None and len(short_reason("x" * 2000)) == 500


async def test_the_last_failure_outlives_rays_next_message():
    retrying = LOAD_FAILED.replace("The deployment failed to start 3 times in a row", "A replica failed")
    view = View(d=overview("UPDATING", 0, retrying, STARTING=1))
    availability = Availability({"m": "d"}, view)
    await availability.refresh()
    view.deployments = {"d": overview("UPDATING", 0, "Deployment 'd' has 1 replicas that have taken more "
                                                     "than 30s to initialize.", STARTING=1)}
    await availability.refresh()
    state = availability.state("m")
    assert state.last_failure == "SourceError: model directory '/nope' does not exist"
    assert "30s" in state.describe() and state.last_failure in state.describe()
    view.deployments = {"d": overview("HEALTHY", 1)}
    await availability.refresh()
    assert availability.state("m").last_failure is None


class View:
    """A fake ``serve.status()`` reader whose answer the test changes."""

    def __init__(self, **deployments):
        self.deployments = deployments

    def __call__(self):
        return self.deployments


async def test_check_refuses_a_model_without_replicas_and_passes_others():
    view = View(good=overview("HEALTHY", 1), bad=overview("DEPLOY_FAILED", 0, LOAD_FAILED))
    availability = Availability({"good-model": "good", "bad-model": "bad"}, view)
    await availability.check("bad-model")  # unknown before the first refresh: requests go through
    await availability.refresh()
    await availability.check("good-model")
    with pytest.raises(ModelUnavailable) as refused:
        await availability.check("bad-model")
    err = refused.value
    assert (err.status_code, err.code, err.param, err.headers) == (503, "model_unavailable", "model",
                                                                   {"Retry-After": "1"})
    assert "SourceError: model directory '/nope' does not exist" in err.message and "File" not in err.message


async def test_a_stale_not_ready_view_is_read_again_before_a_request_is_refused():
    view = View(slow=overview("UPDATING", 0))
    availability = Availability({"slow-model": "slow"}, view, interval_s=3600)
    await availability.refresh()  # the view now says: starting
    view.deployments = {"slow": overview("HEALTHY", 1)}  # it came up since the last refresh
    await availability.check("slow-model")  # served, not refused on the stale view
    assert availability.state("slow-model").ready


async def test_guard_abandons_a_queued_request_when_the_model_loses_its_replicas():
    view = View(d=overview("HEALTHY", 1))
    availability = Availability({"m": "d"}, view)
    await availability.refresh()
    closed = asyncio.Event()

    async def queued():  # a request Ray holds until a replica exists: no record ever comes
        try:
            await asyncio.Event().wait()
            yield "never"
        finally:
            closed.set()

    waiting = asyncio.ensure_future(anext(availability.guard("m", queued())))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    view.deployments = {"d": overview("UNHEALTHY", 0, "", STARTING=1)}
    await availability.refresh()
    with pytest.raises(ModelUnavailable, match="deployment 'd' has no running replica"):
        await asyncio.wait_for(waiting, 1)
    assert closed.is_set()  # the upstream request was closed, which cancels it in Ray


async def test_guard_passes_records_through_once_the_first_arrived():
    view = View(d=overview("HEALTHY", 1))
    availability = Availability({"m": "d"}, view)
    await availability.refresh()

    async def records():
        yield 1
        view.deployments = {"d": overview("UNHEALTHY", 0)}
        await availability.refresh()  # lost after the first record: the stream is not cut
        yield 2

    assert [r async for r in availability.guard("m", records())] == [1, 2]


async def test_a_failed_read_keeps_the_last_view():
    def broken():
        raise ConnectionError("controller restarting")

    availability = Availability({"m": "d"}, View(d=overview("HEALTHY", 1)))
    await availability.refresh()
    availability._fetch = broken
    await availability.refresh()
    assert availability.state("m").ready


def test_rays_gave_up_error_and_the_health_error_are_503s():
    import pickle

    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    from app.errors import NotReady, as_serving_error

    gave_up = as_serving_error(DeploymentUnavailableError(DeploymentID(name="d", app_name="a")))
    assert (type(gave_up), gave_up.status_code, gave_up.headers) == (ModelUnavailable, 503, {"Retry-After": "1"})
    not_ready = pickle.loads(pickle.dumps(NotReady("Not ready: m (starting)", {"m": {"state": "starting"}})))
    assert not_ready.status_code == 503
    assert not_ready.body() == {"error": {"message": "Not ready: m (starting)", "type": "server_error",
                                          "param": None, "code": "not_ready"}, "models": {"m": {"state": "starting"}}}
