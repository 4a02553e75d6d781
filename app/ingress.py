"""The OpenAI-compatible HTTP ingress: one route table, one request path.

:data:`ENDPOINTS` lists every route that calls a model: its path and the serving object of its endpoint
family (``app/serving/``). All of them run :meth:`OpenAIIngress.serve`: read the request, look the model
up (an unknown model is a 404 whatever else the body holds), validate the body, call the model
deployment's streaming method, and answer through :func:`app.streaming.respond` (streamed or collected).
Adding an endpoint = a protocol module, a serving module, one row here.

Handlers never build error JSON: they raise ServingError subclasses, and
:func:`app.errors.install_error_handlers` renders every error answer. This process never imports torch,
transformers or PyAV (``tests/unit/test_layout.py``).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.convertors import Convertor, register_url_convertor

from app.allowlist import nameable_models, resolve_allowed
from app.auth import Grant, KeyRing
from app.availability import Availability, read_serve_status
from app.config import IngressSpec, OnDemandSpec
from app.errors import (ModelNotFound, ModelTaskMismatch, NotFound, NotReady, as_serving_error,
                        install_error_handlers)
from app.logs import write_logs_at_once
from app.metrics import RequestMetrics
from app.middleware import ApiKeyAuth, BodySizeLimit, current_grant
from app.playground import OPEN_PATHS as PLAYGROUND_PATHS, router as playground
from app.protocol.models import ModelCard, ModelList
from app.serving.audio import TRANSCRIPTION, TRANSLATION
from app.serving.base import Serving
from app.serving.chat import CHAT
from app.serving.completions import COMPLETIONS
from app.serving.embeddings import EMBEDDINGS
from app.serving.pipeline import PIPELINE
from app.serving.responses import RESPONSES
from app.serving.tokenize import DETOKENIZE, TOKENIZE
from app.streaming import respond, upstream, without_marks


class ExactPath(Convertor[str]):
    """``{name:exactpath}``: the rest of the path, slashes included, exactly as the client sent it.

    Starlette's ``path`` convertor (``.*``) stops at a newline, and a route's pattern ends in ``$``, which
    in Python also matches before a final newline: ``/v1/models/demo-chat%0A`` matched
    ``/v1/models/{model:path}`` with ``model = "demo-chat"`` and answered with that model's card. This
    one takes newlines too, so the parameter is the whole remainder (``"demo-chat\n"``, a 404).
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return str(value)


register_url_convertor("exactpath", ExactPath())


@dataclass(frozen=True)
class Endpoint:
    """One row of the route table: ``POST path`` is served by ``serving``."""

    path: str
    serving: Serving
    summary: str


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", CHAT, "Create a chat completion"),
    Endpoint("/v1/completions", COMPLETIONS, "Create a completion"),
    Endpoint("/v1/responses", RESPONSES, "Create a model response"),
    Endpoint("/tokenize", TOKENIZE, "Tokenize a prompt or chat messages"),
    Endpoint("/detokenize", DETOKENIZE, "Turn token ids back into text"),
    Endpoint("/v1/audio/transcriptions", TRANSCRIPTION, "Transcribe audio"),
    Endpoint("/v1/audio/translations", TRANSLATION, "Translate audio into English"),
    Endpoint("/v1/embeddings", EMBEDDINGS, "Create embeddings"),
    # The Hugging Face Inference API shape (InferenceClient(model="http://host:8000/models/<id>")).
    Endpoint("/models/{model:exactpath}", PIPELINE, "Run a pipeline task (fill-mask) on the model of the path"),
)

api = FastAPI(title="serve-transformers", description="OpenAI-compatible API for transformers models "
              "on Ray Serve.")
install_error_handlers(api)
# Settings the module-level app needs before a replica exists; OpenAIIngress.__init__ sets the real ones.
api.state.settings = IngressSpec()
api.add_middleware(BodySizeLimit, limit=lambda: api.state.settings.max_request_body_bytes)
# Added last, so outermost: a request without a valid key is refused before its body is read.
api.state.keyring = None
# Open without a key: /health (load balancers, probes) and the playground's static page, script and
# stylesheet and `/` (a browser navigation sends no Authorization header; the page holds no data, and
# every API call it makes sends the key the user typed).
api.add_middleware(ApiKeyAuth, keyring=lambda: api.state.keyring,
                   open_paths=frozenset({"/health", *PLAYGROUND_PATHS}))


def add_endpoint(app: FastAPI, endpoint: Endpoint) -> None:
    """Route ``POST endpoint.path`` of ``app`` to the ingress's one request path."""

    async def handler(request: Request) -> Response:
        return await app.state.ingress.serve(endpoint, request)

    # The handler reads the raw request, so FastAPI sees no path parameters: document them here.
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{(\w+)(?::\w+)?}", endpoint.path)]
    app.add_api_route(endpoint.path, handler, methods=["POST"], summary=endpoint.summary,
                      openapi_extra={"requestBody": endpoint.serving.openapi(),
                                     **({"parameters": parameters} if parameters else {})})


for _endpoint in ENDPOINTS:
    add_endpoint(api, _endpoint)
api.include_router(playground)  # GET /playground (app/playground.py) and / redirecting there


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the request models the table's routes reference (they read raw bodies)."""
    if api.openapi_schema is None:
        schema = FastAPI.openapi(api)
        models = {e.serving.request_model for e in ENDPOINTS}
        _, defs = models_json_schema([(m, "validation") for m in models],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


def own_transport(handle: DeploymentHandle | None) -> DeploymentHandle | None:
    """``handle``, calling its deployment the way this process's Ray is configured to.

    A handle carries its transport (a Ray actor call, or gRPC with ``RAY_SERVE_THROUGHPUT_OPTIMIZED``)
    from the process that built the app, which read Ray's settings when it imported ``ray.serve``. A
    program that sets those variables later (``app.local.serve_locally`` in the tests and the bench)
    built handles that made actor calls while the README's ``serve run`` makes gRPC calls; measured side by
    side, gRPC serves 13-39% more tokens/s at 8 and 32 clients. Here the handle takes this replica's own
    setting, so every way of starting the app runs the same path."""
    if handle is None:
        return None
    try:
        from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT
        return handle.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)
    except (ImportError, TypeError):  # another Ray: its handles keep the transport they came with
        return handle


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, specs: list[Any], handles: dict[str, DeploymentHandle],
                 settings: IngressSpec | None = None, *, on_demand: OnDemandSpec | None = None,
                 multiplexed: DeploymentHandle | None = None, directory: DeploymentHandle | None = None) -> None:
        write_logs_at_once()
        self._specs = {spec.id: spec for spec in specs}
        self._handles = {model: own_transport(h) for model, h in handles.items()}
        self._on_demand = on_demand
        self._multiplexed, self._directory = own_transport(multiplexed), own_transport(directory)
        self._created = int(time.time())
        self._context_lens: dict[str, int | None] = {}
        self.settings = settings or IngressSpec()
        api.state.settings = self.settings
        api.state.keyring = KeyRing.load(self.settings.auth)  # ValueError: keys required but none found
        api.state.ingress = self
        app_name = serve.get_replica_context().app_name
        units = {spec.id: spec.deployment_name for spec in specs}
        if on_demand is not None:
            units[on_demand.deployment] = on_demand.deployment
        self.availability = Availability(units, lambda: read_serve_status(app_name))
        self.availability.start()  # Serve runs the constructor on the replica's event loop

    async def _spec(self, model: str, task: str, grant: Grant | None) -> Any:
        """A pinned model's spec, else an allowed on-demand model's (app/allowlist.py): 404 for an unknown
        model, one the API key may not use (the same answer: names do not leak) or another task's, 503
        when its deployment has no running replica."""
        spec = self._specs.get(model) or resolve_allowed(self._on_demand, model)
        if spec is None or grant is None or not grant.allows(model):
            raise ModelNotFound(model)
        if spec.task != task:
            raise ModelTaskMismatch(model, spec.task, task)
        await self.availability.check(self._unit(spec))
        return spec

    def _unit(self, spec: Any) -> str:
        """What the availability view tracks for ``spec``: a pinned model, or the on-demand deployment."""
        return spec.id if spec.id in self._specs else self._on_demand.deployment

    def _handle(self, spec: Any) -> DeploymentHandle:
        if spec.id in self._specs:
            return self._handles[spec.id]
        return self._multiplexed.options(multiplexed_model_id=spec.id)

    async def serve(self, endpoint: Endpoint, request: Request) -> Response:
        """The one request path of every model route (see the module docstring); every request's outcome
        and timings go to its :class:`RequestMetrics`."""
        serving = endpoint.serving
        metrics = RequestMetrics(endpoint.path, serving.method == "generate")
        try:
            inbound = await serving.read(request)
            spec = await self._spec(inbound.model, serving.task, current_grant())
            metrics.model = spec.id
            body = await serving.validate(inbound, spec)
            handle = self._handle(spec)
            await serving.screen(body, inbound, spec, handle)
            args = await serving.args(body, inbound, spec)
            method = getattr(handle.options(stream=True), serving.method)
            served: dict[str, str] = {}
            records = self.availability.guard(self._unit(spec), upstream(method.remote(*args)))
            chunks = serving.chunks(without_marks(records, served, metrics), body)
            response = await respond(chunks, stream=serving.streams(body), collect=lambda c: serving.collect(c, body),
                                     dump=lambda c: serving.dump(c, body), render=lambda x: serving.render(x, body),
                                     timeout_s=self.settings.request_timeout_s, on_end=metrics.end)
        except asyncio.CancelledError:  # the client hung up while a non-streamed answer was made
            metrics.end(cancelled=True)
            raise
        except Exception as exc:  # (respond reported its own errors first: end() keeps the first)
            metrics.end(as_serving_error(exc))
            raise
        response.headers.update(served)
        return response

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        """Pinned models, then every allowed on-demand model this server can name, with its status,
        task and (where known) context length; only those the request's API key may use."""
        grant = current_grant()
        pinned = [model for model in self._specs if grant.allows(model)]
        cards = list(await asyncio.gather(*(self._pinned_card(model) for model in pinned)))
        if self._on_demand is not None:
            names = await asyncio.to_thread(nameable_models, self._on_demand)  # reads directories
            states = await self._on_demand_states()
            cards += [self._on_demand_card(n, states) for n in names if n not in self._specs and grant.allows(n)]
        return ModelList(data=cards).model_dump(exclude_none=True)

    @api.get("/v1/models/{model:exactpath}")
    async def get_model(self, model: str) -> dict[str, Any]:
        if not current_grant().allows(model):
            raise ModelNotFound(model)
        if model in self._specs:
            return (await self._pinned_card(model)).model_dump(exclude_none=True)
        if resolve_allowed(self._on_demand, model) is None:
            raise ModelNotFound(model)
        return self._on_demand_card(model, await self._on_demand_states()).model_dump(exclude_none=True)

    def _on_demand_card(self, model: str, states: dict[str, dict[str, int]]) -> ModelCard:
        counts = states.get(model, {})
        status = "loaded" if counts.get("loaded") else "loading" if counts.get("loading") else "available"
        spec = resolve_allowed(self._on_demand, model)
        return ModelCard(id=model, created=self._created, status=status, loaded_replicas=counts.get("loaded", 0),
                         task=spec.task, max_model_len=spec.limits.max_context_len)

    async def _pinned_card(self, model: str) -> ModelCard:
        spec, current = self._specs[model], self.availability.state(model)
        state = current.state if current is not None else "unknown"
        return ModelCard(id=model, created=self._created, status="pinned", state=state, task=spec.task,
                         max_model_len=await self._context_len(model) if state == "ready" else None)

    async def _context_len(self, model: str, timeout_s: float = 2.0) -> int | None:
        """A pinned model's context length in tokens, as its engine reports it (``stats()["context_len"]``;
        asked once); None for an engine without one, or when its replica does not answer in time."""
        if model not in self._context_lens:
            try:
                stats = await asyncio.wait_for(self._handles[model].stats.remote(), timeout_s)
            except Exception:  # busy or just gone: the card goes out without it, asked again next time
                return None
            self._context_lens[model] = stats.get("context_len")
        return self._context_lens[model]

    @api.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str) -> None:
        """Nothing is stored (README: Responses), so no response can be retrieved."""
        raise NotFound(f"No response with id '{response_id}': this server does not store responses (`store` "
                       "is ignored); send the whole conversation in `input` instead of `previous_response_id`.",
                       param="response_id")

    async def _on_demand_states(self) -> dict[str, dict[str, int]]:
        """Per model, on how many replicas it is loaded or loading (the directory; empty if it fails)."""
        if self._directory is None:
            return {}
        try:
            return await asyncio.wait_for(self._directory.snapshot.remote(), timeout=5)
        except Exception:  # the listing still answers: every model shows as available
            return {}

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Per-model readiness, answered from the availability view (no call waits for a missing replica).

        200 ``{"status": "ok", "models": {id: state}}`` when every model has a running replica; else 503,
        an OpenAI error (``code: not_ready``) whose body also holds the same ``models`` map. A state is
        :class:`~app.availability.ModelState` plus ``config_error``: a refused live ``user_config``, as
        reported by one replica's stats (null when none, or when the replica did not answer in time).
        With API keys on, a request without a valid key gets the status alone (no model names).
        """
        if current_grant() is None:
            return await self._anonymous_health()
        states = await self.availability.snapshot()
        ready = [m for m, s in states.items() if s is not None and s.ready]
        errors = dict(zip(ready, await asyncio.gather(*(self._config_error(m) for m in ready))))
        models = {m: {**(s.as_dict() if s is not None else {"state": "unknown"}),
                      "config_error": errors.get(m)} for m, s in states.items()}
        waiting = [f"{m} ({s['state']})" for m, s in models.items() if s["state"] != "ready"]
        if waiting:
            raise NotReady(f"Not ready: {', '.join(waiting)}; see `models` for the reasons.", models)
        return JSONResponse({"status": "ok", "models": models})

    async def _anonymous_health(self) -> JSONResponse:
        states = await self.availability.snapshot()
        waiting = sum(1 for s in states.values() if s is None or not s.ready)
        if waiting:
            raise NotReady(f"Not ready: {waiting} of {len(states)} models.", {})
        return JSONResponse({"status": "ok"})

    async def _config_error(self, model: str, timeout_s: float = 2.0) -> str | None:
        try:
            stats = await asyncio.wait_for(self._handles.get(model, self._multiplexed).stats.remote(), timeout_s)
        except Exception:  # busy or just gone: readiness comes from Ray's view, not from this call
            return None
        return stats.get("config_error")
