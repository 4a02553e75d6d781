"""A text-generation wire request, prepared for the engine: what every generation endpoint shares.

Chat completions, completions and responses (which the ingress maps onto a chat request) all become a
:class:`Prepared`: one :class:`GenerationRequest` per prompt (a chat request has one prompt; a
completions request one per prompt it lists) plus the text each choice echoes first
(``deployments.engines.preparers`` makes them). :func:`merged` turns the per-prompt record streams back into the
one stream the ingress reads, numbering choices across prompts (``prompt_index * n + choice``) as
OpenAI's completions do. So the deployments and the engine have one generation path for every family.
When the request has tools, each choice's text goes through the model's tool-call parser on the way
(``tool_format``, ``deployments.engines.tool_parsers``): content stays text, calls become ``tool_calls``
pieces, and a choice that called a tool and stopped finishes with ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from deployments.engines.records import Delta, GenerationRequest


@dataclass
class Prepared:
    """One wire request as engine requests (one per prompt, each with ``n`` choices)."""

    requests: list[GenerationRequest]
    echo: list[str] = field(default_factory=list)  # per request: text each of its choices starts with
    tool_format: Any = None  # a tool_parsers format: parses each choice's output into tool calls

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True


def _shifted(items: list[Delta], offset: int) -> list[Delta]:
    return items if not offset else [dataclasses.replace(d, index=d.index + offset) for d in items]


async def parsed(stream: AsyncIterator[list[Delta]], tool_format: Any) -> AsyncIterator[list[Delta]]:
    """``stream`` with each choice's text split by a parser of ``tool_format`` into content and
    tool-call pieces (see the module docstring)."""
    parsers: dict[int, Any] = {}
    async for items in stream:
        out = []
        for d in items:
            parser = parsers.get(d.index) or parsers.setdefault(d.index, tool_format.parser())
            text, calls = parser.feed(d.text) if d.text else ("", [])
            finish = d.finish_reason
            if finish is not None:
                rest, more = parser.finish()
                text, calls = text + rest, calls + more
                finish = "tool_calls" if parser.calls and finish == "stop" else finish
            out.append(dataclasses.replace(d, text=text, tool_calls=calls, finish_reason=finish))
        yield out


async def merged(prepared: Prepared, streams: list[AsyncIterator[list[Delta]]]) -> AsyncIterator[list[Delta]]:
    """One record stream for the whole request: each prompt's echoes first, then its streams' records
    as they come (through the tool-call parser when the request has tools), choice indices shifted past
    the earlier prompts' choices. Leaving early (or an error in any stream) closes every stream, which
    cancels the request's rows in the engine."""
    if prepared.tool_format is not None:
        streams = [parsed(s, prepared.tool_format) for s in streams]
    offsets = [sum(r.n for r in prepared.requests[:k]) for k in range(len(prepared.requests))]
    echoes = [Delta(index=offsets[k] + i, text=text)
              for k, text in enumerate(prepared.echo) if text for i in range(prepared.requests[k].n)]
    if echoes:
        yield echoes
    if len(streams) == 1:  # the common case (every chat request): no tasks, no queue
        try:
            async for items in streams[0]:
                yield items
        finally:
            if hasattr(streams[0], "aclose"):  # an async generator (engine streams need no closing)
                await streams[0].aclose()
            prepared.cancel()
        return
    queue: asyncio.Queue[tuple[int, list[Delta] | None, BaseException | None]] = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator[list[Delta]]) -> None:
        try:
            async for items in stream:
                queue.put_nowait((k, items, None))
            queue.put_nowait((k, None, None))
        except Exception as exc:  # handed to the reader below, which raises it
            queue.put_nowait((k, None, exc))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            k, items, error = await queue.get()
            if error is not None:
                raise error
            if items is None:
                open_streams -= 1
            else:
                yield _shifted(items, offsets[k])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        prepared.cancel()
