"""Copy serve_config.gpu.yaml into cluster/rayservice.yaml's ``serveConfigV2`` (``--check``: only
report whether they differ; exit 1 if so). The RayService must deploy exactly the config that
``python -m app.check`` and the tests validate, so the copy is generated, never edited.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
SOURCE = ROOT / "serve_config.gpu.yaml"
BEGIN, END = "# BEGIN serve_config.gpu.yaml", "# END serve_config.gpu.yaml"
INDENT = " " * 4  # serveConfigV2's block scalar, under spec:


def render(manifest: str, source: str) -> str:
    """``manifest`` with the block between the BEGIN/END markers replaced by ``source``, indented."""
    lines = manifest.splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.strip().startswith(BEGIN))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith(END))
    body = [INDENT + line if line.strip() else "\n" for line in source.splitlines(keepends=True)]
    if body and not body[-1].endswith("\n"):
        body[-1] += "\n"
    return "".join([*lines[:begin + 1], *body, *lines[end:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the manifest is out of date")
    args = parser.parse_args(argv)
    current = MANIFEST.read_text()
    wanted = render(current, SOURCE.read_text())
    if args.check:
        if wanted != current:
            print(f"{MANIFEST} is out of date with {SOURCE}: run python cluster/render_rayservice.py")
            return 1
        return 0
    MANIFEST.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
