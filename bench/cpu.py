"""CPU seconds per process role during a level: where the machine's time goes, robust to a noisy host.

Wall-clock figures on a shared 2-CPU machine move with whatever else runs; the CPU time each of the
server's processes spends per output token does not (much). :func:`roles` sorts a server's process tree
into the roles of the serving path: for our server ``proxy`` (HAProxy and Ray Serve's HTTP proxy), ``ingress`` (the
FastAPI replica), ``model`` (the model replica: engine threads and its event loop) and ``ray`` (raylet,
GCS and other Ray daemons); any other server is one ``server`` role. ``client`` is the load generator
(this process).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import psutil

# First match wins. In Ray's throughput mode HAProxy (a child of the HAProxyManager actor) replaces the
# Python proxy in front of the ingress; Ray's Python proxy may still run beside it, idle.
_ROLES = (("ProxyActor", "proxy"), ("haproxy", "proxy"), ("HAProxyMan", "proxy"), ("OpenAIIngress", "ingress"),
          ("ServeReplica", "model"), ("ServeController", "ray"))


def _role(title: str) -> str | None:
    for marker, role in _ROLES:
        if marker in title:
            return role
    return None


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def snapshot(server_pid: int | None) -> dict[int, tuple[str, float]]:
    """{pid: (role, cpu seconds so far)} for the server's tree and this process."""
    out: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(psutil.Error):
        me = psutil.Process(os.getpid())
        out[me.pid] = ("client", _cpu(me))
    if server_pid is None:
        return out
    try:
        root = psutil.Process(server_pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    ray_tree = any("ray" in " ".join(p.cmdline()[:2]) for p in family[1:] if _alive(p))
    for p in family:
        with contextlib.suppress(psutil.Error):
            title = " ".join(p.cmdline())
            role = (_role(title) or "ray") if ray_tree else "server"
            out[p.pid] = (role, _cpu(p))
    return out


def _alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.is_running()
    return False


def delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent per role between two snapshots (processes that came or went count from 0)."""
    spent: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        spent[role] = spent.get(role, 0.0) + max(0.0, cpu - before.get(pid, (role, 0.0))[1])
    return spent


@contextlib.contextmanager
def measured(server_pid: int | None, into: dict[str, float]) -> Iterator[None]:
    """Fill ``into`` with the CPU seconds per role spent inside the block."""
    before = snapshot(server_pid)
    try:
        yield
    finally:
        into.update(delta(before, snapshot(server_pid)))
