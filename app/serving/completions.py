"""Completions on the ingress side: engine deltas -> ``text_completion`` chunks, and the non-streamed
response as the collected stream. :data:`COMPLETIONS` is the route table's serving object."""

from __future__ import annotations

import secrets
import time
from typing import Any, AsyncIterator

from app.protocol.common import Usage
from app.protocol.completions import CompletionChoice, CompletionChunk, CompletionRequest
from app.protocol.structured import CompletionLogprobs
from app.serving.generation import GenerationServing, by_choice


async def completion_chunks(deltas: AsyncIterator[list[Any]], *, model: str, n: int,
                            include_usage: bool) -> AsyncIterator[CompletionChunk]:
    """The deployment's delta lists as chunks: per message, one chunk per choice that has news (its
    text, and its ``finish_reason`` when it ended); then, if ``include_usage``, one chunk with empty
    ``choices`` and the usage. Choice ``i`` belongs to prompt ``i // n``, whose tokens count once."""
    chunk_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    prompt_tokens: dict[int, int] = {}
    offsets: dict[int, int] = {}  # per choice: characters of logprob tokens so far (text_offset)
    completion_tokens = 0
    async for batch in deltas:
        for index, items in by_choice(batch).items():
            last = items[-1]
            if last.finish_reason is not None:
                prompt_tokens[index // n] = last.prompt_tokens
                completion_tokens += last.completion_tokens
            records = [r for d in items for r in d.logprobs or ()]
            logprobs = None
            if records:
                logprobs = CompletionLogprobs()
                offsets[index] = logprobs.extend(records, offsets.get(index, 0))
            yield CompletionChunk(id=chunk_id, created=created, model=model, choices=[CompletionChoice(
                index=index, text="".join(d.text for d in items), finish_reason=last.finish_reason,
                logprobs=logprobs)])
    if include_usage:
        prompt = sum(prompt_tokens.values())
        yield CompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=Usage(
            prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens))


async def collect_completion(chunks: AsyncIterator[CompletionChunk]) -> CompletionChunk:
    """The non-streamed response: the chunks (with usage) folded into one, choices in index order."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    logprobs: dict[int, CompletionLogprobs] = {}
    head = usage = None
    async for c in chunks:
        head = head or c
        usage = c.usage or usage
        for choice in c.choices:
            texts.setdefault(choice.index, []).append(choice.text)
            if choice.logprobs is not None:
                whole = logprobs.setdefault(choice.index, CompletionLogprobs())
                for name in CompletionLogprobs.model_fields:
                    getattr(whole, name).extend(getattr(choice.logprobs, name))
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert head is not None and usage is not None, "a completions stream always ends with a usage chunk"
    choices = [CompletionChoice(index=i, text="".join(texts[i]), finish_reason=finish[i], logprobs=logprobs.get(i))
               for i in sorted(texts)]
    return CompletionChunk(id=head.id, created=head.created, model=head.model, choices=choices, usage=usage)


class CompletionServing(GenerationServing):
    """``POST /v1/completions``: a chat model's ``generate`` method, prompts tokenized as they are."""

    request_model = CompletionRequest

    def chunks(self, records: AsyncIterator[list[Any]], body: CompletionRequest):
        return completion_chunks(records, model=body.model, n=body.n,
                                 include_usage=body.include_usage or not body.stream)

    async def collect(self, chunks: AsyncIterator[CompletionChunk], body: CompletionRequest):
        return await collect_completion(chunks)

    def dump(self, chunk: CompletionChunk, body: CompletionRequest) -> dict[str, Any]:
        """``usage`` appears only in the last SSE chunk, and only if asked for (the spec's completion
        object has no null usage)."""
        return chunk.model_dump(exclude=None if chunk.usage is not None and body.include_usage else {"usage"})


COMPLETIONS = CompletionServing()
