"""Model loading runs on a thread that ends with it (``deployments.engines.base.on_passing_thread``), so
the OpenMP team that the load's parallel ops start goes away with it and the model thread is the
process's only one (why: the decorator's docstring)."""

from __future__ import annotations

import subprocess
import sys
import threading
import textwrap

import pytest

from deployments.engines.base import on_passing_thread
from deployments.models import loader


def test_the_caller_gets_the_result_or_the_exception_from_a_thread_that_has_ended():
    seen: list[threading.Thread] = []

    @on_passing_thread
    def work(x, *, y):
        seen.append(threading.current_thread())
        if x < 0:
            raise ValueError("negative")
        return x + y

    assert work(2, y=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="negative"):
        work(-1, y=0)
    assert work.__name__ == "work"


def test_every_loader_runs_on_a_passing_thread():
    for fn in (loader.load_chat_engine, loader.load_whisper_engine, loader.prepare_chat):
        assert fn.__code__ is on_passing_thread(lambda: None).__code__, fn.__name__


# In a fresh interpreter (no OpenMP team yet): how many OS threads a 2-thread torch product leaves
# behind in the process, run on the main thread or through the decorator.
_PROBE = textwrap.dedent("""
    import os, sys, time, torch
    from deployments.engines.base import on_passing_thread
    torch.set_num_threads(2)
    def tasks():
        return len(os.listdir("/proc/self/task"))
    def product():
        torch.set_num_threads(2)
        a = torch.ones(512, 512)
        for _ in range(5):
            a = (a @ a).clamp_(max=1.0)
    before = tasks()
    (on_passing_thread(product) if sys.argv[1] == "passing" else product)()
    deadline = time.monotonic() + 5
    while tasks() > before and time.monotonic() < deadline:  # exiting workers leave within microseconds
        time.sleep(0.01)
    print(tasks() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_parallel_work_on_a_passing_thread_leaves_no_openmp_workers_behind():
    def left_behind(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                             timeout=120, check=True)
        return int(out.stdout.split()[-1])

    assert left_behind("main") >= 1  # the main thread's team keeps its worker: what the loaders avoid
    assert left_behind("passing") == 0
