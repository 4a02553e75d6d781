"""The OpenAI-compatible HTTP ingress: thin handlers that route by ``model`` to a deployment handle.

Handlers validate the body (pydantic, via FastAPI), look the model up, and hand the deployment's stream
to :func:`app.streaming.respond`. They never build error JSON: they raise ServingError subclasses, and
:func:`app.errors.install_error_handlers` renders every error answer.
"""


import asyncio
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import ModelSpec
from app.errors import InvalidRequest, ModelNotFound, Overloaded, install_error_handlers
from app.protocol.chat import ChatCompletionRequest
from app.protocol.models import ModelCard, ModelList
from app.serving_chat import chat_chunks, collect_chat, dump_chunk
from app.streaming import respond

api = FastAPI(title="serve-transformers", description="OpenAI-compatible API for transformers models "
              "on Ray Serve.")
install_error_handlers(api)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, specs: list[ModelSpec], handles: dict[str, DeploymentHandle]) -> None:
        self._specs = {spec.id: spec for spec in specs}
        self._handles = handles
        self._created = int(time.time())

    def _handle(self, model: str, task: str) -> DeploymentHandle:
        spec = self._specs.get(model)
        if spec is None:
            raise ModelNotFound(model)
        if spec.task != task:
            raise InvalidRequest(f"model '{model}' serves {spec.task}, not {task}", param="model",
                                 code="model_task_mismatch")
        return self._handles[model]

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        cards = [ModelCard(id=model, created=self._created) for model in self._specs]
        return ModelList(data=cards).model_dump()

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str) -> dict[str, Any]:
        if model not in self._specs:
            raise ModelNotFound(model)
        return ModelCard(id=model, created=self._created).model_dump()

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 once every model deployment answers its health probe, else 503."""
        probes = [h.check_health.remote() for h in self._handles.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*probes), timeout=10)
        except Exception as exc:
            raise Overloaded(f"not ready: {type(exc).__name__}", code="not_ready") from exc
        return JSONResponse({"status": "ok", "models": list(self._specs)})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        handle = self._handle(body.model, "chat")
        deltas = handle.options(stream=True).chat.remote(body)
        include_usage = body.include_usage or not body.stream
        chunks = chat_chunks(deltas, model=body.model, n=body.n, include_usage=include_usage)
        return await respond(chunks, stream=body.stream, collect=collect_chat,
                             dump=dump_chunk(body.include_usage))
