"""Contenders (a) and (b): this server, in a private Ray instance, as a subprocess of the bench.

``python -m bench.serve_ours --port P --args JSON`` starts Ray with ``address="local"`` (never attaching to
another Ray on the machine, as tests/conftest.py does), runs ``app.builder.build_app(args)`` on Serve at
127.0.0.1:P and blocks; SIGTERM / SIGINT shut Serve and Ray down cleanly and exit.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--args", required=True, help="build_app args (AppArgs) as JSON")
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--env", default="{}", help="extra env vars of the Ray workers, as JSON")
    opts = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    sys.path.insert(0, str(ROOT))
    import ray
    from ray import serve

    from app.local import serve_locally

    try:
        serve_locally(json.loads(opts.args), port=opts.port, num_cpus=opts.num_cpus,
                      env=json.loads(opts.env), timeout_s=600)
        print(f"serve_ours: ready on 127.0.0.1:{opts.port}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
