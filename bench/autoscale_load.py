"""Closed-loop chat load and a replica sampler, for the cluster tests and the autoscaling bench.

:class:`ClosedLoop` runs ``clients`` threads, each sending one streamed chat completion after another
until stopped, and records every request: when it started and ended, and how it ended. Outcomes:
``ok`` (the stream ended with ``[DONE]`` and no error), ``http`` (an error status with an OpenAI error
body), ``stream_error`` (an error frame inside a started stream), ``connection`` (connection refused or
reset: no answer at all), ``hang`` (nothing for ``timeout_s``: the one outcome that is never acceptable).

:class:`Sampler` polls a callable (e.g. the Serve API's replica count) once a second in a thread.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import httpx
import numpy as np

CLEAN_ERRORS = ("http", "stream_error", "connection")


@dataclass
class Call:
    start: float  # time.time()
    end: float
    outcome: str  # ok | http | stream_error | connection | hang
    detail: str = ""


def chat_once(client: httpx.Client, base: str, model: str, max_tokens: int, prompt: str,
              n: int = 1) -> tuple[str, str]:
    """One streamed chat completion (``n`` choices); returns (outcome, detail)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "n": n}
    try:
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = r.read().decode(errors="replace")
                try:
                    error = json.loads(text)["error"]
                    return "http", f"{r.status_code} {error.get('code') or error.get('type')}"
                except (ValueError, KeyError, TypeError):
                    return "http", f"{r.status_code} (not an OpenAI error body) {text[:80]!r}"
            done = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                if '"error"' in data and "error" in json.loads(data):
                    return "stream_error", str(json.loads(data)["error"].get("code"))
            return ("ok", "") if done else ("connection", "stream ended without [DONE]")
    except httpx.TimeoutException as exc:
        return "hang", type(exc).__name__
    except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
        return "connection", type(exc).__name__


class ClosedLoop:
    """``clients`` closed-loop streaming clients against ``base`` (see the module docstring)."""

    def __init__(self, base: str, model: str, clients: int, max_tokens: int = 32, timeout_s: float = 60,
                 prompt: str = "Tell me a long story about a cluster of machines.", n: int = 1) -> None:
        self.base, self.model, self.max_tokens, self.timeout_s, self.prompt = base, model, max_tokens, timeout_s, prompt
        self.n = n
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        timeout = httpx.Timeout(self.timeout_s, connect=10)
        with httpx.Client(timeout=timeout) as client:
            while not self._stop.is_set():
                t0 = time.time()
                outcome, detail = chat_once(client, self.base, self.model, self.max_tokens, self.prompt, self.n)
                with self._lock:
                    self.calls.append(Call(t0, time.time(), outcome, detail))
                if outcome != "ok":
                    time.sleep(0.2)  # a client that got an error retries, but not in a hot loop

    def start(self) -> "ClosedLoop":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 15)
        return self.snapshot()

    def resize(self, clients: int) -> None:
        """Add clients (a burst): only growing is supported; stop() ends them all."""
        new = [threading.Thread(target=self._run, daemon=True) for _ in range(clients - len(self._threads))]
        self._threads += new
        for t in new:
            t.start()

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)


def outcomes(calls: list[Call]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in calls:
        out[c.outcome] = out.get(c.outcome, 0) + 1
    return out


def longest_gap(calls: list[Call], since: float) -> float:
    """Longest time after ``since`` with no request *completing* successfully (the outage a client sees)."""
    ends = sorted(c.end for c in calls if c.outcome == "ok" and c.end >= since)
    marks = [since, *ends]
    return max((b - a for a, b in zip(marks, marks[1:])), default=float("inf"))


class Sampler:
    """Call ``probe()`` about every ``period_s`` in a thread; keep (time, value) pairs (errors skipped)."""

    def __init__(self, probe: Callable[[], Any], period_s: float = 1.0) -> None:
        self.probe, self.period_s = probe, period_s
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.probe()))
            except Exception:  # the API may be briefly unreachable (e.g. during a node loss)
                pass
            self._stop.wait(self.period_s)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples


def windows(calls: list[Call], t0: float, t1: float, step_s: float = 5.0) -> list[dict[str, Any]]:
    """Per ``step_s`` window from t0: completed requests/s, ok count and p50/p99 latency (s)."""
    out = []
    for a in np.arange(t0, t1, step_s):
        inside = [c for c in calls if a <= c.end < a + step_s]
        lat = [c.end - c.start for c in inside if c.outcome == "ok"]
        out.append({"t": float(a - t0), "rate": len(inside) / step_s, "ok": len(lat),
                    "p50": float(np.percentile(lat, 50)) if lat else None,
                    "p99": float(np.percentile(lat, 99)) if lat else None})
    return out


def to_dicts(calls: list[Call]) -> list[dict[str, Any]]:
    return [asdict(c) for c in calls]
