"""``/v1/models`` wire models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve-transformers"
    # Extensions: `pinned` = a deployment of its own; on-demand models are `loaded` (on `loaded_replicas`
    # replicas), `loading`, or `available` (allowed, loaded on the first request).
    status: Literal["pinned", "loaded", "loading", "available"] | None = None
    loaded_replicas: int | None = None
    # Extension, pinned models: `ready`, `starting` (loading: no replica running yet), `unavailable` (its
    # load failed, see /health) or `unknown` (before the ingress's first read of Serve's status).
    state: Literal["ready", "starting", "unavailable", "unknown"] | None = None
    task: str | None = None  # extension: what it serves (chat, embedding, transcription, fill-mask, ...)
    max_model_len: int | None = None  # extension (vLLM's name): context length in tokens, where it applies


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
