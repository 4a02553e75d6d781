"""One command for the whole comparison:

    python -m bench.run --levels 1,8,32 --max-tokens 64

Starts every contender of the config in turn (see bench/contenders.py), warms it up, drives it at each
concurrency level with each prompt mix (the same prompt lists for all), stops it, and writes
bench/results/latest.{md,json,png} (rewritten after every contender, so an interrupted run still leaves a
report). ``rounds`` repeats the whole sequence in alternating order (A B C, C B A) and pools the rounds,
so the drift of a shared machine falls on every contender alike. A contender that cannot start or fails
is reported with its error, never silently omitted. For servers, the CPU time of each process role
(proxy, ingress, model replica, Ray daemons; the load generator as ``client``) is recorded per level, and
the peak resident memory of what holds the model (our model replica, the other server's process tree; for
in-process contenders the bench process's growth).

``--profile ours:32`` also records py-spy profiles (speedscope JSON) of contender ``ours``'s Ray processes
(replica, ingress, proxy) during its 32-client level, into bench/results/profiles/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import psutil

from bench import cpu
from bench.config import DEFAULT_CONFIG, RESULTS_DIR, BenchConfig, load_config, model_dir
from bench.contenders import CONTENDERS, RunContext
from bench.load import summarize
from bench.prompts import make_prompts
from bench.report import readme_section, update_readme, write_report


def machine_info(config: BenchConfig) -> dict[str, Any]:
    import ray
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus": psutil.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__,
            "gpu": torch.cuda.is_available(), "model_params": _param_count(model_dir(config.model)),
            "code": _code_version()}


def _code_version() -> str:
    """The commit the server code was measured at, and the server files that differed from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "deployments"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def _param_count(path: Path) -> str:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return f"{total / 1e6:.1f}M"


@contextlib.contextmanager
def profiled(driver: Any, out_dir: Path, tag: str) -> Iterator[None]:
    """py-spy record every Ray process under the contender's server (SIGINT makes py-spy write out)."""
    pid = getattr(driver, "server_pid", None)
    procs = []
    if pid is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                title = " ".join(child.cmdline())
                for role in ("ServeReplica", "ProxyActor"):
                    if role in title:
                        name = title.split()[0].replace("ray::", "").replace(":", "_")
                        out = out_dir / f"{tag}-{name}-{child.pid}.speedscope.json"
                        procs.append(subprocess.Popen(
                            ["py-spy", "record", "--pid", str(child.pid), "--rate", "100", "--nonblocking",
                             "--format", "speedscope", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(60)


# What model_rss measures, by the cpu.py role of the processes it sums ("client" = in-process contenders).
RSS_OF = {"model": "model replica process", "server": "server process tree (sum)",
          "client": "bench process, growth since the contender started (in-process)"}


def model_rss(server_pid: int | None, base_bytes: int) -> tuple[float, str]:
    """(resident MB, what was measured) of the process that holds a contender's model: our server's model
    replica(s) (role ``model`` of bench/cpu.py: the Ray workers titled ``ray::ServeReplica:...`` other than
    the ingress), another server's whole process tree, or, for an in-process contender (no server), this
    process's RSS above ``base_bytes`` (its RSS before the contender started)."""
    if server_pid is None:
        return max(0, psutil.Process().memory_info().rss - base_bytes) / 2**20, RSS_OF["client"]
    tree = {pid: role for pid, (role, _) in cpu.snapshot(server_pid).items() if role != "client"}
    # Another server may hold its model in a child: `transformers serve --continuous-batching` runs its
    # batching manager in a multiprocessing (spawn) child that holds the weights and the KV cache, so its
    # whole tree counts.
    role = "model" if "model" in tree.values() else "server"
    total = 0
    for pid in (pid for pid, r in tree.items() if r == role):
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20, RSS_OF[role]


@contextlib.contextmanager
def rss_peak(server_pid: int | None, base_bytes: int, into: dict[str, Any], every_s: float = 1.0
             ) -> Iterator[None]:
    """Sample :func:`model_rss` every ``every_s`` (on a thread: the psutil walk stays off the load
    generator's event loop) and once at the end of the block; ``into`` gets ``rss_mb`` (the peak) and
    ``rss_of``."""
    stop = threading.Event()

    def sample() -> None:
        mb, what = model_rss(server_pid, base_bytes)
        if mb >= into.get("rss_mb", 0.0):
            into.update(rss_mb=mb, rss_of=what)

    def loop() -> None:
        while not stop.wait(every_s):
            sample()

    thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sample()


def wait_until_quiet(log=print, busy_percent: float = 15.0, timeout_s: float = 60.0) -> None:
    """Wait (up to ``timeout_s``) until the machine's CPUs are idle over one second: the processes of
    the contender that just stopped (Ray's daemons exit over several seconds) must not run beside the
    next one's first level."""
    deadline = time.monotonic() + timeout_s
    while (busy := psutil.cpu_percent(interval=1.0)) > busy_percent and time.monotonic() < deadline:
        pass
    if busy > busy_percent:
        log(f"   (machine still {busy:.0f}% busy after {timeout_s:.0f}s; measuring anyway)")


async def run_contender(key: str, config: BenchConfig, prompt_sets: dict[str, list], ctx: RunContext,
                        profile: set[tuple[str, int]], log=print) -> dict[str, Any]:
    """Start contender ``key``, measure its (mix, level) plan once; returns {"error", "runs"}, where
    runs maps (mix, level) to (records, wall seconds, CPU seconds per role, {rss_mb, rss_of}: the peak
    resident memory of the model's process during the level)."""
    contender = CONTENDERS[key]
    runs: dict[tuple[str, int], tuple[list, float, dict[str, float], dict[str, Any]]] = {}
    error = None
    wait_until_quiet(log)
    started = time.perf_counter()
    base_rss = psutil.Process().memory_info().rss  # in-process contenders: their memory is what it grows by
    try:
        with contender.start(config, ctx) as driver:
            log(f"[{key}] up after {time.perf_counter() - started:.0f}s; warming up")
            warm = prompt_sets[next(iter(prompt_sets))]
            await driver.warmup(warm[-config.warmup_requests:] if config.warmup_requests else [],
                                config.max_tokens)
            for mix, level in config.plan(key):
                prompts = prompt_sets[mix][:config.requests_at(level)]
                spent: dict[str, float] = {}
                memory: dict[str, Any] = {}
                server = getattr(driver, "server_pid", None)
                with (profiled(driver, ctx.log_dir.parent / "profiles", f"{key}-{mix}-c{level}")
                      if (key, level) in profile else contextlib.nullcontext()), cpu.measured(server, spent), \
                        rss_peak(server, base_rss, memory):
                    records, wall = await driver.measure(prompts, level, config.max_tokens,
                                                         config.max_level_seconds)
                runs[(mix, level)] = (records, wall, spent, memory)
                stats = summarize(records, level, len(prompts), wall, driver.tokens_counted)
                log(f"[{key}] {mix} clients={level} done={stats.requests}/{len(prompts)} err={stats.errors} "
                    f"tok/s={stats.tokens_per_s:.1f} ttft_p50={_ms(stats.ttft_p50)} "
                    f"itl_p50={_ms(stats.itl_p50)} chunks/req={stats.chunks_per_request or 0:.1f} "
                    f"rss={memory.get('rss_mb', 0):.0f}MB ({memory.get('rss_of')})")
    except Exception as exc:  # noqa: BLE001 - reported, never silently omitted
        error = f"{type(exc).__name__}: {exc}"
        log(f"[{key}] FAILED: {error}\n{traceback.format_exc(limit=3)}")
    return {"error": error, "runs": runs}


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.0f}ms"


def pool(rounds: list[dict[str, Any]], level: int, planned: int, tokens_counted: str | None) -> dict[str, Any]:
    """One level's figures from the runs of all rounds: requests pooled, wall times and CPU added, the
    model process's resident memory (``model_rss_mb``, MB) the peak of all rounds."""
    records = [r for records, *_ in rounds for r in records]
    wall = sum(w for _, w, *_ in rounds)
    stats = summarize(records, level, planned * len(rounds), wall, tokens_counted)
    cpu_s: dict[str, float] = {}
    for _, _, spent, *_ in rounds:
        for role, seconds in spent.items():
            cpu_s[role] = cpu_s.get(role, 0.0) + seconds
    if stats.output_tokens:
        stats.cpu_ms_per_token = {role: 1e3 * s / stats.output_tokens for role, s in sorted(cpu_s.items())}
    stats.rounds = len(rounds)
    figures = stats.to_dict()
    peaks = [m["rss_mb"] for *_, m in rounds if m.get("rss_mb") is not None]
    figures["model_rss_mb"] = max(peaks, default=None)
    return figures


async def run_bench(config: BenchConfig, out_dir: Path, command: str, stem: str = "latest",
                    profile: set[tuple[str, int]] = frozenset(), log=print) -> dict[str, Any]:
    unknown = [k for k in config.contenders if k not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")
    most = max(config.requests_at(level) for level in config.levels)
    prompt_sets = {mix: make_prompts(most, spec) for mix, spec in config.mixes.items()}
    ctx = RunContext(log_dir=out_dir / "logs")
    results: dict[str, Any] = {
        "command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(config), "config": config.model_dump(), "contenders": {}}
    collected: dict[str, list[dict[str, Any]]] = {key: [] for key in config.contenders}
    for round_ in range(config.rounds):
        order = config.contenders if round_ % 2 == 0 else config.contenders[::-1]
        for key in order:
            log(f"== round {round_ + 1}/{config.rounds}: {key}")
            collected[key].append(await run_contender(key, config, prompt_sets, ctx, profile, log))
            results["contenders"] = {k: _entry(k, config, collected[k]) for k in config.contenders}
            write_report(results, out_dir, stem)
    return results


def _entry(key: str, config: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    contender = CONTENDERS[key]
    errors = [r["error"] for r in runs if r["error"]]
    mixes: dict[str, list[dict[str, Any]]] = {}
    for mix, level in config.plan(key):
        done = [r["runs"][(mix, level)] for r in runs if (mix, level) in r["runs"]]
        if done:
            counted = "generate" if key == "offline" else None
            mixes.setdefault(mix, []).append(pool(done, level, config.requests_at(level), counted))
    measured = [m.get("rss_of") for r in runs for *_, m in r["runs"].values() if m.get("rss_of")]
    return {"label": contender.label, "description": contender.description,
            "status": "ok" if mixes else ("failed" if errors else "pending"),
            "error": "; ".join(dict.fromkeys(errors)) or None, "mixes": mixes,
            "rss_of": measured[0] if measured else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--levels", type=ints, help="comma-separated client counts, e.g. 1,8,32")
    p.add_argument("--mixes", type=lambda s: s.split(","), help="subset of the config's prompt mixes")
    p.add_argument("--rounds", type=int, help="times each contender is started and measured")
    p.add_argument("--requests-per-level", type=int)
    p.add_argument("--rounds-per-client", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--max-level-seconds", type=float)
    p.add_argument("--warmup-requests", type=int)
    p.add_argument("--contenders", type=lambda s: s.split(","), help=f"subset of {','.join(CONTENDERS)}")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--stem", default="latest", help="output file names: <stem>.md/.json/.png")
    p.add_argument("--readme", metavar="PATH",
                   help="also rewrite the bench.run block of this file (bench/README.md's chat comparison)")
    p.add_argument("--profile", action="append", default=[], metavar="KEY:CLIENTS",
                   help="py-spy profile a server contender's Ray processes during one level")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, levels=args.levels, requests_per_level=args.requests_per_level,
                         rounds_per_client=args.rounds_per_client, max_tokens=args.max_tokens,
                         max_level_seconds=args.max_level_seconds, warmup_requests=args.warmup_requests,
                         contenders=args.contenders, rounds=args.rounds)
    if args.mixes:
        config = config.model_copy(update={"mixes": {m: config.mixes[m] for m in args.mixes}})
    profile = {(k, int(c)) for k, c in (p.split(":") for p in args.profile)}
    command = "python -m bench.run " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    results = asyncio.run(run_bench(config, Path(args.out_dir), command.strip(), args.stem, profile))
    print(json.dumps({k: e["status"] for k, e in results["contenders"].items()}))
    if args.readme:
        readme = Path(args.readme)
        # The block's links (plot, full report) are relative to the file it is written into.
        results_dir = os.path.relpath(Path(args.out_dir).resolve(), readme.resolve().parent)
        update_readme(readme, readme_section(results, results_dir))
        print(f"updated the bench.run block of {args.readme}")
    print(f"wrote {Path(args.out_dir) / args.stem}.md/.json/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
