"""Chat completions on the ingress side: engine deltas -> ``ChatCompletionChunk`` stream, and the
non-streamed response as the collected stream. :data:`CHAT` is the route table's serving object."""

from __future__ import annotations

import secrets
import time
from typing import Any, AsyncIterator

from app.protocol.chat import (AssistantMessage, ChatCompletionChunk, ChatCompletionRequest,
                               ChatCompletionResponse, Choice, ChunkChoice, Delta)
from app.protocol.common import Usage
from app.protocol.structured import ChoiceLogprobs, chat_logprobs
from app.protocol.tools import FunctionCallOut, ToolCallOut, tool_call_chunks
from app.serving.generation import GenerationServing, by_choice


async def chat_chunks(deltas: AsyncIterator[list[Any]], *, model: str, include_usage: bool,
                      echo: str = "") -> AsyncIterator[ChatCompletionChunk]:
    """Turn the deployment's stream of delta lists into OpenAI chunks.

    Order per choice: one chunk with the role, a chunk with ``echo`` (the request's echoed text) if any,
    content chunks (the deltas of one message for one choice are coalesced into one chunk, with their
    tokens' logprobs when asked), tool calls as ``delta.tool_calls`` chunks (one call per chunk, the
    fragments of one message joined), one chunk with an
    empty delta and the finish_reason; then, if ``include_usage``, one chunk with empty ``choices`` and
    the usage.
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
            logprobs = [r for d in items for r in d.logprobs or ()]
            if text or logprobs:
                yield chunk([ChunkChoice(index=index, delta=Delta(content=text or None), logprobs=ChoiceLogprobs(
                    content=chat_logprobs(logprobs)) if logprobs else None)])
            for call in tool_call_chunks([piece for d in items for piece in d.tool_calls]):
                yield chunk([ChunkChoice(index=index, delta=Delta(tool_calls=[call]))])  # one call a chunk
            last = items[-1]
            if last.finish_reason is not None:
                prompt_tokens = last.prompt_tokens
                completion_tokens += last.completion_tokens
                yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=last.finish_reason)])
    if include_usage:
        yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens))


class _Collected:
    """One choice's collected answer: text, tool calls (by call index) and logprobs."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.calls: dict[int, tuple[str, str, list[str]]] = {}  # index -> (id, name, argument fragments)
        self.logprobs: list[Any] | None = None
        self.finish = "stop"

    def add(self, choice: ChunkChoice) -> None:
        self.texts.append(choice.delta.content or "")
        for piece in choice.delta.tool_calls or ():
            call = self.calls.setdefault(piece.index, (piece.id or "", piece.function.name or "", []))
            call[2].append(piece.function.arguments or "")
        if choice.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(choice.logprobs.content or [])  # in place: one copy per chunk was quadratic
        if choice.finish_reason is not None:
            self.finish = choice.finish_reason

    def choice(self, index: int) -> Choice:
        text = "".join(self.texts)
        calls = [ToolCallOut(id=id_, function=FunctionCallOut(name=name, arguments="".join(args)))
                 for _, (id_, name, args) in sorted(self.calls.items())] or None
        # With tool calls and no text, content is null (as OpenAI answers).
        message = AssistantMessage(content=None if calls and not text else text, tool_calls=calls)
        logprobs = None if self.logprobs is None else ChoiceLogprobs(content=self.logprobs)
        return Choice(index=index, message=message, logprobs=logprobs, finish_reason=self.finish)


async def collect_chat(chunks: AsyncIterator[ChatCompletionChunk]) -> ChatCompletionResponse:
    """The non-streamed response: the chunks of :func:`chat_chunks` (with usage) folded together."""
    collected: dict[int, _Collected] = {}
    usage = head = None
    async for c in chunks:
        head = head or c
        usage = c.usage or usage
        for choice in c.choices:
            collected.setdefault(choice.index, _Collected()).add(choice)
    assert head is not None and usage is not None, "a chat stream always ends with a usage chunk"
    choices = [collected[i].choice(i) for i in sorted(collected)]
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
