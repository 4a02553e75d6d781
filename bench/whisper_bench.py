"""Audio seconds transcribed per wall second by the Whisper deployment: batching on vs max_batch_size=1.

Starts a private local Ray Serve (like tests/conftest.py, on a free port) serving only a Whisper model,
sends ``--requests`` clips of ``--seconds`` each with ``--concurrency`` clients, and reports
audio-seconds / wall-second for each max_batch_size given. Example (the README's figures):

    python bench/whisper_bench.py --requests 32 --seconds 10 --concurrency 16 --batch-sizes 8 1
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * rng.uniform(0.2, 1) * t)) / 16000
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.2 * env * sum(np.sin(k * phase) / k for k in range(1, 6))).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="demo:whisper", help="model source (demo:whisper, dir, hub id)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--num-cpus", type=float, default=1.0, help="ray_actor_options.num_cpus of the model")
    args = ap.parse_args()

    import ray
    import requests
    from ray import serve

    from app.builder import compose_app
    from deployments.engines.audio import encode_audio

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
    files = [encode_audio(clip(args.seconds, i), "wav") for i in range(args.requests)]

    def one(data: bytes) -> None:
        r = requests.post(url, files={"file": ("a.wav", data, "audio/wav")},
                          data={"model": "whisper", "language": "en"}, timeout=600)
        r.raise_for_status()

    print(f"{args.requests} requests x {args.seconds:g} s audio, concurrency {args.concurrency}, "
          f"source {args.source}")
    for size in args.batch_sizes:
        app_args = {"models": [{"id": "whisper", "source": args.source, "task": "transcription",
                                "batching": {"max_batch_size": size, "batch_wait_timeout_s": 0.05}}]}
        options = {"whisper": {"ray_actor_options": {"num_cpus": args.num_cpus}}}
        serve.run(compose_app(app_args, options), name="bench", route_prefix="/")
        one(files[0])  # warm-up: model loaded, first batch compiled
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, files))
        wall = time.perf_counter() - start
        audio = args.requests * args.seconds
        print(f"max_batch_size={size:3d}: {audio:.0f} s audio in {wall:.2f} s wall = "
              f"{audio / wall:.1f} audio-s/s")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
