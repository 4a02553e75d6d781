"""The real ingress request path over fake model handles, without Ray: for unit tests of one endpoint."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.config import IngressSpec
from app.errors import install_error_handlers
from app.ingress import Endpoint, OpenAIIngress, add_endpoint


class OpenDoor:
    """Availability stand-in: every model is ready."""

    async def check(self, unit: str) -> None:
        return None

    def state(self, unit: str) -> None:
        return None  # unknown

    def guard(self, unit: str, records):
        return records


def ingress_app(row: Endpoint, specs: list[Any], handles: dict[str, Any]) -> FastAPI:
    """An app serving ``row`` through :meth:`OpenAIIngress.serve`, with ``specs`` pinned and each model's
    deployment handle taken from ``handles`` (by model id)."""
    app = FastAPI()
    install_error_handlers(app)
    add_endpoint(app, row)
    ingress = OpenAIIngress.func_or_class.__new__(OpenAIIngress.func_or_class)
    ingress._specs = {spec.id: spec for spec in specs}
    ingress._handles, ingress._on_demand, ingress._multiplexed = dict(handles), None, None
    ingress.settings, ingress.availability = IngressSpec(), OpenDoor()
    app.state.ingress = ingress
    return app
