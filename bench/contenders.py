"""The contenders: how each one is started and stopped, as a registry of context managers.

Each entry's ``start(config, ctx)`` is a context manager yielding a :class:`bench.load.Driver`; leaving it
stops the contender. Server contenders run as subprocesses on a free loopback port, in their own session;
stopping sends SIGTERM (our server then shuts Serve and Ray down itself), waits, and finally kills every
descendant process still alive, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import httpx
import psutil

from app.local import free_port
from bench.config import BenchConfig, model_dir
from bench.load import Driver, HttpDriver

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunContext:
    log_dir: Path  # one <key>.log per subprocess contender


@dataclass(frozen=True)
class Contender:
    key: str
    label: str  # the letter of the issue and a short name, as shown in the report
    description: str
    start: Callable[[BenchConfig, RunContext], ContextManager[Driver]]


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM the leader, wait for it, then SIGKILL any descendant (Ray's raylet, workers) still alive."""
    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Descendants spawned after the snapshot share the session: collect them too.
    family += [p for p in psutil.process_iter() if _in_session(p, proc.pid)]
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _in_session(p: psutil.Process, sid: int) -> bool:
    try:
        return p.pid != os.getpid() and os.getsid(p.pid) == sid
    except (OSError, psutil.Error):
        return False


@contextlib.contextmanager
def managed_server(cmd: list[str], health_url: str, log_path: Path, timeout_s: float,
                   env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (its own session, output to ``log_path``) until ``health_url`` answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before it was healthy:\n"
                                   f"{_log_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health_url, timeout=10).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"not healthy after {timeout_s:.0f}s:\n{_log_tail(log_path)}")
            time.sleep(1)
        yield proc
    finally:
        stop_process_tree(proc)


def _ours(batching_field: str, tuned_env: bool = False, diagnostic_threads: bool = False,
          spec_extra: dict[str, Any] | None = None, tag: str = ""
          ) -> Callable[[BenchConfig, RunContext], ContextManager[Driver]]:
    """Our server; ``spec_extra`` adds ChatModelSpec fields (dtype, quantization, ...) to its one model,
    ``tag`` names its log apart."""
    @contextlib.contextmanager
    def start(config: BenchConfig, ctx: RunContext) -> Iterator[Driver]:
        ours = config.ours
        batching = getattr(ours, batching_field).model_dump()
        threads = ours.diagnostic_decode_threads if diagnostic_threads else ours.decode_threads
        args = {"models": [{"id": ours.model_id, "source": config.model, "task": "chat",
                            "batching": batching, "prefill_threads": ours.prefill_threads,
                            "decode_threads": threads,
                            "limits": {"default_max_tokens": config.max_tokens, "max_tokens": 4096},
                            **(spec_extra or {})}]}
        port = free_port()
        cmd = [sys.executable, "-m", "bench.serve_ours", "--port", str(port), "--args", json.dumps(args),
               "--num-cpus", str(ours.ray_num_cpus)]
        env = {**ours.env, **(ours.tuned_env if tuned_env else {})}
        cmd += ["--env", json.dumps(env)]  # for the workers; the raylet reads RAY_* from its own env
        log = ctx.log_dir / (f"ours-{batching_field}{'-env' if tuned_env else ''}"
                             f"{'-t' if diagnostic_threads else ''}{tag}.log")
        with managed_server(cmd, f"http://127.0.0.1:{port}/health", log, config.startup_timeout_s,
                            env) as proc:
            yield HttpDriver(f"http://127.0.0.1:{port}", ours.model_id, server_pid=proc.pid)

    return start


def _transformers_serve(continuous_batching: bool):
    @contextlib.contextmanager
    def start(config: BenchConfig, ctx: RunContext) -> Iterator[Driver]:
        path = str(model_dir(config.model))
        port = free_port()
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", path, "--host",
               "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
               "--continuous-batching" if continuous_batching else "--no-continuous-batching"]
        log = ctx.log_dir / f"tf-serve{'-cb' if continuous_batching else ''}.log"
        # Offline: the model is a local directory; never reach for the hub.
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with managed_server(cmd, f"http://127.0.0.1:{port}/health", log, config.startup_timeout_s,
                            env) as proc:
            yield HttpDriver(f"http://127.0.0.1:{port}", path, server_pid=proc.pid)

    return start


@contextlib.contextmanager
def _naive(config: BenchConfig, ctx: RunContext) -> Iterator[Driver]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.naive_server", "--model", str(model_dir(config.model)),
           "--port", str(port)]
    with managed_server(cmd, f"http://127.0.0.1:{port}/health", ctx.log_dir / "naive.log",
                        config.startup_timeout_s) as proc:
        yield HttpDriver(f"http://127.0.0.1:{port}", "naive", server_pid=proc.pid)


@contextlib.contextmanager
def _offline(config: BenchConfig, ctx: RunContext) -> Iterator[Driver]:
    from bench.offline import OfflineDriver

    driver = OfflineDriver(model_dir(config.model), threads=2)
    try:
        yield driver
    finally:
        driver.close()


def _engine(diagnostic_threads: bool = False, spec_extra: dict[str, Any] | None = None
            ) -> Callable[[BenchConfig, RunContext], ContextManager[Driver]]:
    @contextlib.contextmanager
    def start(config: BenchConfig, ctx: RunContext) -> Iterator[Driver]:
        from bench.engine_direct import EngineDriver

        ours = config.ours
        threads = ours.diagnostic_decode_threads if diagnostic_threads else 2
        driver = EngineDriver(model_dir(config.model), threads=threads, prefill_threads=ours.prefill_threads,
                              batching=ours.batching.model_dump(), spec_extra=spec_extra)
        try:
            yield driver
        finally:
            driver.close()

    return start


# The model spec fields of the reduced-precision contenders (ours-* and engine-* alike).
BF16: dict[str, Any] = {"dtype": "bfloat16"}
INT8: dict[str, Any] = {"quantization": "int8", "device": "cpu"}

CONTENDERS: dict[str, Contender] = {c.key: c for c in [
    Contender("ours", "(a) ours", "this server (the README's `serve run` path: HAProxy, ingress, model replica over gRPC), "
              "dynamic + continuous batching and threads as serve_config.yaml's demo-chat", _ours("batching")),
    Contender("ours-bs1", "(b) ours bs=1", "this server, max_batch_size=1 and max_running_rows=1 "
              "(one request at a time)", _ours("batching_bs1")),
    # (a) decoding on `ours.diagnostic_decode_threads` threads: with engine-t1, the serving path's cost
    # when it has a core of its own (what a machine with more cores than decode threads gives).
    Contender("ours-t1", "(a1) ours 1 thread", "(a) with decode_threads from "
              "`ours.diagnostic_decode_threads` (1: the other core left to the proxy and ingress)",
              _ours("batching", diagnostic_threads=True)),
    # Diagnostic, not in the default list: (a) with ours.tuned_env (2 torch threads in the replica).
    Contender("ours-env", "(a*) ours + env", "(a) with the Ray workers' env from `ours.tuned_env` "
              "(OMP_NUM_THREADS=2: the replica's torch uses both cores)", _ours("batching", tuned_env=True)),
    Contender("ours-bf16", "(a) ours bf16", "(a) with the weights in bfloat16 (`dtype: bfloat16`)",
              _ours("batching", spec_extra=BF16, tag="-bf16")),
    Contender("ours-int8", "(a) ours int8", "(a) with int8 weight-only quantization (`quantization: int8`, "
              "torchao; decodes with the transformers forward, not the engine's fast path)",
              _ours("batching", spec_extra=INT8, tag="-int8")),
    Contender("tf-serve", "(c) transformers serve", "`transformers serve` (no continuous batching)",
              _transformers_serve(False)),
    Contender("tf-serve-cb", "(c) transformers serve --cb", "`transformers serve --continuous-batching`",
              _transformers_serve(True)),
    Contender("naive", "(d) naive", "one Starlette app, one asyncio queue, one model thread, "
              "one request at a time", _naive),
    Contender("offline", "(e) HF generate", "batched model.generate in-process on 2 threads, no HTTP "
              "(static batches of `clients` requests)", _offline),
    Contender("engine", "(f) engine alone", "our GenerationEngine driven in-process on 2 threads: no "
              "Ray, no HTTP (the ceiling of the serving path)", _engine()),
    Contender("engine-bf16", "(f) engine alone bf16", "(f) with the weights in bfloat16",
              _engine(spec_extra=BF16)),
    Contender("engine-int8", "(f) engine alone int8", "(f) with int8 weight-only quantization (torchao)",
              _engine(spec_extra=INT8)),
    # ours-t1's ceiling.
    Contender("engine-t1", "(f1) engine alone 1 thread", "(f) decoding on `ours.diagnostic_decode_threads` "
              "threads", _engine(diagnostic_threads=True)),
]}
