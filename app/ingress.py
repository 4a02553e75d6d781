"""The OpenAI-compatible HTTP ingress: thin handlers that route by ``model`` to a deployment handle.

Handlers validate the body (pydantic, via FastAPI), look the model up, and hand the deployment's stream
to :func:`app.streaming.respond`. They never build error JSON: they raise ServingError subclasses, and
:func:`app.errors.install_error_handlers` renders every error answer.
"""


import asyncio
import time
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import IngressSpec, ModelSpec
from app.errors import InvalidRequest, ModelNotFound, ReplicaUnavailable, install_error_handlers
from app.middleware import BodySizeLimit
from app.protocol.chat import ChatCompletionRequest
from app.protocol.models import ModelCard, ModelList
from app.serving_audio import read_upload, respond_transcript, transcript_chunks, transcription_request
from app.serving_chat import chat_chunks, collect_chat, dump_chunk
from app.streaming import respond, upstream

api = FastAPI(title="serve-transformers", description="OpenAI-compatible API for transformers models "
              "on Ray Serve.")
install_error_handlers(api)
# Settings the module-level app needs before a replica exists; OpenAIIngress.__init__ sets the real ones.
api.state.settings = IngressSpec()
api.add_middleware(BodySizeLimit, limit=lambda: api.state.settings.max_request_body_bytes)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, specs: list[ModelSpec], handles: dict[str, DeploymentHandle],
                 settings: IngressSpec | None = None) -> None:
        self._specs = {spec.id: spec for spec in specs}
        self._handles = handles
        self._created = int(time.time())
        self.settings = settings or IngressSpec()
        api.state.settings = self.settings

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
            raise ReplicaUnavailable(f"not ready: {type(exc).__name__}", code="not_ready") from exc
        return JSONResponse({"status": "ok", "models": list(self._specs)})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        handle = self._handle(body.model, "chat")
        deltas = upstream(handle.options(stream=True).chat.remote(body))
        include_usage = body.include_usage or not body.stream
        chunks = chat_chunks(deltas, model=body.model, include_usage=include_usage)
        return await respond(chunks, stream=body.stream, collect=collect_chat,
                             dump=dump_chunk(body.include_usage), timeout_s=self.settings.request_timeout_s)

    @api.post("/v1/audio/transcriptions")
    async def transcriptions(
            self, file: UploadFile = File(...), model: str = Form(...), language: str | None = Form(None),
            prompt: str | None = Form(None), response_format: str | None = Form(None),
            temperature: str | None = Form(None), stream: str | None = Form(None),
            granularities: list[str] | None = Form(None, alias="timestamp_granularities[]"),
            granularities_plain: list[str] | None = Form(None, alias="timestamp_granularities")):
        fields = dict(model=model, language=language, prompt=prompt, response_format=response_format,
                      temperature=temperature, stream=stream,
                      timestamp_granularities=(granularities or []) + (granularities_plain or []))
        return await self._audio(transcription_request("transcribe", fields), file)

    @api.post("/v1/audio/translations")
    async def translations(
            self, file: UploadFile = File(...), model: str = Form(...), prompt: str | None = Form(None),
            response_format: str | None = Form(None), temperature: str | None = Form(None),
            stream: str | None = Form(None)):
        fields = dict(model=model, prompt=prompt, response_format=response_format,
                      temperature=temperature, stream=stream)
        return await self._audio(transcription_request("translate", fields), file)

    async def _audio(self, body, file: UploadFile):
        handle = self._handle(body.model, "transcription")
        audio = await read_upload(file, self._specs[body.model].audio.max_upload_bytes)
        outputs = upstream(handle.options(stream=True).transcribe.remote(body, audio))
        return await respond_transcript(transcript_chunks(outputs), body,
                                        timeout_s=self.settings.request_timeout_s)
