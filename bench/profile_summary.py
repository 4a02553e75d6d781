"""Summarise py-spy speedscope profiles (from ``python -m bench.run --profile KEY:CLIENTS``).

``python -m bench.profile_summary bench/results/profiles/*.speedscope.json [--top 15]`` prints, per
profiled process and thread, the share of samples where the thread was busy, and the functions with the
most self ("leaf") and inclusive samples; idle frames (waiting in select/epoll/locks) are counted apart.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

_IDLE = ("select", "epoll_wait", "poll", "wait", "_wait_for_tstate_lock", "acquire", "sleep", "get",
         "_worker", "run_forever", "recv", "accept")


def _label(frame: dict) -> str:
    file = Path(frame.get("file") or "?")
    return f"{frame['name']} ({'/'.join(file.parts[-2:])}:{frame.get('line', '?')})"


def summarize(path: Path, top: int = 15) -> str:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    out = [f"== {path.name}"]
    for profile in data["profiles"]:
        samples, weights = profile["samples"], profile.get("weights") or [1] * len(profile["samples"])
        total = sum(weights)
        if not total:
            continue
        leaf, inclusive = Counter(), Counter()
        idle = 0
        for stack, w in zip(samples, weights):
            if not stack:
                continue
            name = frames[stack[-1]]["name"]
            if name in _IDLE:
                idle += w
                continue
            leaf[_label(frames[stack[-1]])] += w
            for f in set(stack):
                inclusive[_label(frames[f])] += w
        busy = total - idle
        out.append(f"-- thread {profile.get('name')}: {total} samples, busy {busy / total:.0%}")
        if busy:
            out.append("   self:")
            out += [f"     {n / busy:6.1%}  {k}" for k, n in leaf.most_common(top)]
            out.append("   inclusive:")
            out += [f"     {n / busy:6.1%}  {k}" for k, n in inclusive.most_common(top)]
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
