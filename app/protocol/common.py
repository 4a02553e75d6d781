"""Wire pieces shared by several endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Base of request models: unknown fields are ignored (clients send vendor extras), known ones are
    validated strictly enough that a bad value is a 400 naming the field."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
