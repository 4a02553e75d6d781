"""What a deployment's streaming method puts before its records (deployments/metrics.py ``timed``)."""

from app.streaming import ReplicaTime


def without_replica_time(lists: list[list]) -> list[list]:
    """``lists`` (one call's streamed lists) checked to start with one ReplicaTime of the replica's
    seconds to its first records, and returned without it."""
    assert lists and isinstance(lists[0][0], ReplicaTime) and lists[0][0].seconds >= 0, lists[:1]
    assert not any(isinstance(item, ReplicaTime) for items in lists for item in items[1:])
    return [lists[0][1:], *lists[1:]]
