"""Embeddings on the ingress side; :data:`EMBEDDINGS` is the route table's serving object.

The embedding deployment streams one list of
:class:`deployments.engines.embedding_records.EmbeddingOutput` per request (plain data: each vector as its
float32 little-endian bytes). The answer is never streamed: ``collect`` folds the records
into a ``CreateEmbeddingResponse``, with each vector as a list of floats or, for ``encoding_format:
base64``, those same bytes base64-encoded (what the openai SDK decodes with ``numpy.frombuffer(...,
dtype="float32")``). A large answer is serialised off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, AsyncIterator

from fastapi.responses import Response

from app.errors import InvalidRequest
from app.protocol.embeddings import CreateEmbeddingResponse, Embedding, EmbeddingRequest, EmbeddingUsage
from app.serving.base import Inbound, Serving

# Answers with more numbers than this are built and serialised on a worker thread (about 15 ms of work:
# 2048 x 384 floats take 0.18 s).
OFF_LOOP_NUMBERS = 64 * 1024

ENCODERS = {"float": lambda out: out.floats(), "base64": lambda out: base64.b64encode(out.vector).decode("ascii")}


async def embedding_records(records: AsyncIterator[list[Any]]) -> AsyncIterator[Any]:
    """The deployment's lists of records, one record at a time."""
    async for batch in records:
        for record in batch:
            yield record


def embedding_body(records: list[Any], body: EmbeddingRequest) -> bytes:
    """The JSON of the ``CreateEmbeddingResponse`` for ``records`` (in input order)."""
    encode = ENCODERS[body.encoding_format]
    records = sorted(records, key=lambda r: r.index)
    tokens = sum(r.prompt_tokens for r in records)
    response = CreateEmbeddingResponse(
        data=[Embedding(index=r.index, embedding=encode(r)) for r in records], model=body.model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return response.model_dump_json().encode()


class EmbeddingServing(Serving):
    """``POST /v1/embeddings``: an embedding model's ``embed`` method."""

    task = "embedding"
    method = "embed"
    request_model = EmbeddingRequest

    async def validate(self, inbound: Inbound, spec: Any) -> EmbeddingRequest:
        """The request, with no more inputs than the model's ``limits.max_inputs``."""
        body = await super().validate(inbound, spec)
        if body.count > spec.limits.max_inputs:
            raise InvalidRequest(f"Invalid value for 'input': {body.count} inputs, more than this model takes in "
                                 f"one request ({spec.limits.max_inputs}).", param="input")
        return body

    def streams(self, body: EmbeddingRequest) -> bool:
        return False

    def chunks(self, records: AsyncIterator[list[Any]], body: EmbeddingRequest):
        return embedding_records(records)

    async def collect(self, chunks: AsyncIterator[Any], body: EmbeddingRequest) -> bytes:
        records = [r async for r in chunks]
        numbers = sum(len(r.vector) // 4 for r in records)
        if numbers > OFF_LOOP_NUMBERS:
            return await asyncio.to_thread(embedding_body, records, body)
        return embedding_body(records, body)

    def render(self, collected: bytes, body: EmbeddingRequest) -> Response:
        return Response(content=collected, media_type="application/json")


EMBEDDINGS = EmbeddingServing()
