"""Summarise py-spy speedscope profiles (from ``python -m bench.run --profile KEY:CLIENTS``).

``python -m bench.profile_summary bench/results/profiles/*.speedscope.json [--top 15]`` prints, per
profiled process, each thread's share of the process's samples, and the functions with the most self
("leaf") and inclusive samples. The profiles are recorded without ``--idle``, so samples are on-CPU time:
a thread's share is where the process spent its CPU.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def _label(frame: dict) -> str:
    file = Path(frame.get("file") or "?")
    return f"{frame['name']} ({'/'.join(file.parts[-2:])}:{frame.get('line', '?')})"


def summarize(path: Path, top: int = 15) -> str:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    threads: Counter = Counter()
    leaf: Counter = Counter()
    inclusive: Counter = Counter()
    for profile in data["profiles"]:
        weights = profile.get("weights") or [1] * len(profile["samples"])
        for stack, w in zip(profile["samples"], weights):
            if not stack:
                continue
            threads[profile.get("name")] += w
            leaf[_label(frames[stack[-1]])] += w
            for f in set(stack):
                inclusive[_label(frames[f])] += w
    total = sum(threads.values())
    out = [f"== {path.name}: {total:g} samples"]
    if not total:
        return "\n".join(out)
    out += ["   threads:", *[f"     {n / total:6.1%}  {name}" for name, n in threads.most_common(top)]]
    out += ["   self:", *[f"     {n / total:6.1%}  {k}" for k, n in leaf.most_common(top)]]
    out += ["   inclusive:", *[f"     {n / total:6.1%}  {k}" for k, n in inclusive.most_common(top)]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    opts = parser.parse_args(argv)
    for path in opts.files:
        print(summarize(path, opts.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
