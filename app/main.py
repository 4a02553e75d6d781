"""``app.main:app``: a ready-built Application, for the Ray tools that want one (``serve build``).

``serve build`` imports an *Application*, not a builder, so ``serve build app.builder:build_app`` fails
(``Expected ... to be an Application but got <class 'function'>``). This module builds the application
from the ``args`` of the repository's ``serve_config.yaml`` (``SERVE_CONFIG`` names another file), or from
one demo chat model when there is no such file, so that

    serve build app.main:app -o generated.yaml

writes a config listing every deployment with the options the builder gives it, ready to edit. Building
an Application loads no model (the deployments load theirs in their replicas), so importing this module
is cheap and loads no torch. To deploy, keep ``import_path: app.builder:build_app`` with ``args:`` as in
``serve_config.yaml``, and check the result with ``python -m app.check``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from app.builder import compose_app

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"
FALLBACK_ARGS: dict[str, Any] = {"models": [{"id": "demo-chat", "source": "demo:chat"}]}


def default_args(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``args`` of the first application of ``path`` (default ``$SERVE_CONFIG``, else the repo's
    ``serve_config.yaml``) that uses the builder; :data:`FALLBACK_ARGS` when there is no such file."""
    config_path = Path(path or os.environ.get("SERVE_CONFIG") or DEFAULT_CONFIG)
    if not config_path.is_file():
        return FALLBACK_ARGS
    config = yaml.safe_load(config_path.read_text()) or {}
    for app in config.get("applications") or []:
        if app.get("import_path") == "app.builder:build_app":
            return app.get("args") or {}
    return FALLBACK_ARGS


app = compose_app(default_args())
