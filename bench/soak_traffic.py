"""Mixed closed-loop traffic for the soak (bench/soak.py) and its CI test, and how each request ended.

:class:`MixLoop` runs ``clients`` threads; each sends one request after another, the kind of each drawn
(seeded) by weight from a mix of :class:`Kind` s: chat streamed and not, embeddings, an audio
transcription of a WAV made here, fill-mask, on-demand chat models and a VLM with a data-URL image.

Every request ends in exactly one outcome (:func:`send`):

- ``ok``: a 200 with the expected body; a stream that ended with ``[DONE]`` and carried no error event;
- ``http``: an error status whose body is an OpenAI error (``{"error": {"message", "type", ...}}``);
- ``stream_error``: a started stream with an OpenAI error event, then ``[DONE]`` (a clean end);
- ``refused``: the connection could not be opened (never accepted: nothing was lost);
- ``timeout``: nothing received for ``timeout_s`` (httpx's read timeout: no progress, a hang);
- ``cut``: the connection closed before a whole answer: a body cut short, or a stream without ``[DONE]``;
- ``unclean``: an answer that is neither: an error status without an OpenAI error body, a 200 that is not
  the expected JSON, an error event without message/type.

:data:`FAILURES` are never acceptable; the others are counted and reported.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
import wave
from dataclasses import dataclass
from typing import Any, Callable

import httpx
import numpy as np

FAILURES = ("timeout", "cut", "unclean")
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Count from one to ten.",
           "Explain what a GPU is in one sentence.", "Name three colours."]
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A cluster of machines serves models."]


@dataclass
class Result:
    """One request: wall-clock times (time.time()), its outcome (module docstring) and a detail."""

    kind: str
    deployment: str
    start: float
    end: float
    outcome: str
    detail: str = ""

    @property
    def label(self) -> str:
        """What the outcome counts are keyed by: ``ok``, ``http 503 model_unavailable``, ``timeout``..."""
        return self.outcome if not self.detail or self.outcome in ("ok", "refused", "timeout") else \
            f"{self.outcome} {self.detail}"


@dataclass(frozen=True)
class Kind:
    """One kind of request. ``body(i)`` gives httpx's keyword arguments for the i-th request of a client;
    ``check(body)`` accepts a 200's JSON (not called for streams); ``deployment``: the Serve deployment
    that computes it (a fault's recovery waits for one of its requests to succeed)."""

    name: str
    deployment: str
    weight: float
    path: str
    stream: bool
    body: Callable[[int], dict[str, Any]]
    check: Callable[[Any], bool]


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A short 16-bit mono WAV: a gliding tone with a little noise (speech-like enough for the demo)."""
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * (200 + 150 * t) * t) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((signal * 32767).astype("<i2").tobytes())
    return out.getvalue()


def png_data_url(size: int = 32) -> str:
    """A small striped PNG as a data URL (Pillow, client side only)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (200, 30, 30))
    draw = ImageDraw.Draw(image)
    for x in range(0, size, 8):
        draw.rectangle([x, 0, x + 3, size], fill=(20, 20, 220))
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _chat(model: str, stream: bool, max_tokens: int, image: str | None = None) -> Callable[[int], dict]:
    def body(i: int) -> dict:
        content: Any = PROMPTS[i % len(PROMPTS)]
        if image:
            content = [{"type": "text", "text": "What is in this image?"},
                       {"type": "image_url", "image_url": {"url": image}}]
        return {"json": {"model": model, "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": stream}}
    return body


def _has(key: str) -> Callable[[Any], bool]:
    return lambda body: isinstance(body, dict) and bool(body.get(key))


def default_mix(chat: str = "SmolLM2-135M-Instruct", whisper: str = "demo-whisper",
                embed: str = "all-MiniLM-L6-v2", fill_mask: str = "demo-fill-mask",
                others: tuple[tuple[str, str, str], ...] = (("demo-chat", "on-demand", "stream"),
                                                            ("demo-chat-s1", "on-demand", "json"),
                                                            ("demo-vlm", "on-demand", "image")),
                max_tokens: int = 32) -> list[Kind]:
    """The soak's mix for serve_config.yaml's models. ``others``: (model, its deployment, ``stream`` |
    ``json`` | ``image``) for chat models beside the main one (on-demand ones by default)."""
    audio = wav_bytes()
    chat_ok = _has("choices")
    mix = [
        Kind("chat-stream", chat, 3, "/v1/chat/completions", True, _chat(chat, True, max_tokens), chat_ok),
        Kind("chat", chat, 2, "/v1/chat/completions", False, _chat(chat, False, max_tokens), chat_ok),
        Kind("embeddings", embed, 2, "/v1/embeddings", False,
             lambda i: {"json": {"model": embed, "input": SENTENCES[i % 4:] + SENTENCES[:i % 4]}}, _has("data")),
        Kind("transcription", whisper, 1, "/v1/audio/transcriptions", False,
             lambda i: {"files": {"file": ("clip.wav", audio, "audio/wav")}, "data": {"model": whisper}},
             lambda body: isinstance(body, dict) and isinstance(body.get("text"), str)),
        Kind("fill-mask", fill_mask, 1, f"/models/{fill_mask}", False,
             lambda i: {"json": {"inputs": "Paris is the [MASK] of France."}},
             lambda body: isinstance(body, list) and bool(body)),
    ]
    image = png_data_url()
    for model, deployment, how in others:
        body = _chat(model, how != "json", 16, image if how == "image" else None)
        mix.append(Kind(model, deployment, 1, "/v1/chat/completions", how != "json", body, chat_ok))
    return mix


def _openai_error(raw: Any) -> dict | None:
    """The ``error`` object of an OpenAI error body (parsed or raw), or None if it is not one."""
    try:
        error = (json.loads(raw) if isinstance(raw, (bytes, str)) else raw)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    ok = isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
    return error if ok else None


def _read_stream(response: httpx.Response) -> tuple[str, str]:
    error = None
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return ("ok", "") if error is None else ("stream_error", error)
        if '"error"' in data:
            event = json.loads(data)
            if isinstance(event, dict) and "error" in event:
                parsed = _openai_error(event)
                if parsed is None:
                    return "unclean", f"error event without message/type: {data[:80]}"
                error = str(parsed.get("code") or parsed["type"])
    return "cut", "stream ended without [DONE]" + (f" after error {error}" if error else "")


def send(client: httpx.Client, base: str, kind: Kind, i: int) -> tuple[str, str]:
    """One request of ``kind``: (outcome, detail), see the module docstring."""
    try:
        with client.stream("POST", f"{base}{kind.path}", **kind.body(i)) as r:
            if r.status_code != 200:
                raw = r.read()
                error = _openai_error(raw)
                if error is None:
                    return "unclean", f"{r.status_code} {raw[:80]!r}"
                return "http", f"{r.status_code} {error.get('code') or error['type']}"
            if kind.stream:
                return _read_stream(r)
            raw = r.read()
        try:
            ok = kind.check(json.loads(raw))
        except ValueError:
            ok = False
        return ("ok", "") if ok else ("unclean", f"200 without the expected body: {raw[:80]!r}")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        return "refused", type(exc).__name__
    except httpx.TimeoutException as exc:
        return "timeout", type(exc).__name__
    except httpx.TransportError as exc:  # read error, remote protocol error: the answer was cut short
        return "cut", type(exc).__name__


class MixLoop:
    """``clients`` closed-loop threads over ``mix`` against ``base`` until :meth:`stop`; see the module
    docstring. A client that got anything but ``ok`` waits 0.2 s before its next request (no hot loop on
    fast 503s)."""

    def __init__(self, base: str, mix: list[Kind], clients: int, timeout_s: float = 60, seed: int = 0) -> None:
        self.base, self.mix, self.timeout_s, self.seed = base.rstrip("/"), mix, timeout_s, seed
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def _run(self, c: int) -> None:
        rng = random.Random(self.seed * 1000 + c)
        weights = [k.weight for k in self.mix]
        with httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=10)) as client:
            i = 0
            while not self._stop.is_set():
                kind = rng.choices(self.mix, weights)[0]
                t0 = time.time()
                outcome, detail = send(client, self.base, kind, c * 1_000_000 + i)
                with self._lock:
                    self.results.append(Result(kind.name, kind.deployment, t0, time.time(), outcome, detail))
                i += 1
                if outcome != "ok":
                    self._stop.wait(0.2)

    def start(self) -> "MixLoop":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> tuple[list[Result], int]:
        """Stop and wait for the clients; (results, clients still stuck in a request after the wait)."""
        self._stop.set()
        deadline = time.time() + self.timeout_s + 15
        for t in self._threads:
            t.join(max(0.0, deadline - time.time()))
        return self.snapshot(), sum(t.is_alive() for t in self._threads)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)
