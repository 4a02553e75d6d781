"""Chat completions on the ingress side: engine deltas -> ``ChatCompletionChunk`` stream, and the
non-streamed response as the collected stream. :data:`CHAT` is the route table's serving object."""

from __future__ import annotations

import secrets
import time
from typing import Any, AsyncIterator

from app.protocol.chat import (AssistantMessage, ChatCompletionChunk, ChatCompletionRequest,
                               ChatCompletionResponse, Choice, ChunkChoice, Delta)
from app.protocol.common import Usage
from app.serving.generation import GenerationServing, by_choice


async def chat_chunks(deltas: AsyncIterator[list[Any]], *, model: str, include_usage: bool,
                      echo: str = "") -> AsyncIterator[ChatCompletionChunk]:
    """Turn the deployment's stream of delta lists into OpenAI chunks.

    Order per choice: one chunk with the role, a chunk with ``echo`` (the request's echoed text) if any,
    content chunks (the deltas of one message for one choice are coalesced into one chunk), one chunk
    with an empty delta and the finish_reason; then, if ``include_usage``, one chunk with empty
    ``choices`` and the usage.
    """
    chunk_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, usage=usage)

    started: set[int] = set()
    prompt_tokens = completion_tokens = 0
    async for batch in deltas:
        for index, items in by_choice(batch).items():
            if index not in started:
                started.add(index)
                yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
                if echo:
                    yield chunk([ChunkChoice(index=index, delta=Delta(content=echo))])
            text = "".join(d.text for d in items)
            if text:
                yield chunk([ChunkChoice(index=index, delta=Delta(content=text))])
            last = items[-1]
            if last.finish_reason is not None:
                prompt_tokens = last.prompt_tokens
                completion_tokens += last.completion_tokens
                yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=last.finish_reason)])
    if include_usage:
        yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens))


async def collect_chat(chunks: AsyncIterator[ChatCompletionChunk]) -> ChatCompletionResponse:
    """The non-streamed response: the chunks of :func:`chat_chunks` (with usage) folded together."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    usage = head = None
    async for c in chunks:
        head = head or c
        usage = c.usage or usage
        for choice in c.choices:
            texts.setdefault(choice.index, []).append(choice.delta.content or "")
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert head is not None and usage is not None, "a chat stream always ends with a usage chunk"
    choices = [Choice(index=i, message=AssistantMessage(content="".join(texts[i])), finish_reason=finish[i])
               for i in sorted(texts)]
    return ChatCompletionResponse(id=head.id, created=head.created, model=head.model, choices=choices,
                                  usage=usage)


class ChatServing(GenerationServing):
    """``POST /v1/chat/completions``: a chat model's ``generate`` method."""

    request_model = ChatCompletionRequest

    def chunks(self, records: AsyncIterator[list[Any]], body: ChatCompletionRequest):
        # The collected (non-streamed) answer always needs usage.
        return chat_chunks(records, model=body.model, include_usage=body.include_usage or not body.stream,
                           echo=body.echo_text)

    async def collect(self, chunks: AsyncIterator[ChatCompletionChunk], body: ChatCompletionRequest):
        return await collect_chat(chunks)

    def dump(self, chunk: ChatCompletionChunk, body: ChatCompletionRequest) -> dict[str, Any]:
        """``usage`` appears in SSE chunks (null until the last one) only if asked for."""
        return chunk.model_dump(exclude=None if body.include_usage else {"usage"})


CHAT = ChatServing()
