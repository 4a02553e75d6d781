"""Contender (d): the seeds' naive design, as a baseline.

One Starlette app, one asyncio queue, one model thread: every chat request is rendered, put on the queue,
and the single consumer runs ``model.generate`` for one request at a time on the model thread, streaming
its text through a ``TextStreamer`` back to the request's SSE response. No batching of any kind.

``python -m bench.naive_server --model DIR --port P`` (streaming chat completions only, greedy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

_DONE = object()


class _QueueStreamer(TextStreamer):
    """Hands each piece of finished text to the request's asyncio queue, from the model thread."""

    def __init__(self, tokenizer: Any, loop: asyncio.AbstractEventLoop, out: asyncio.Queue) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._loop, self._out = loop, out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._loop.call_soon_threadsafe(self._out.put_nowait, text)


def create_app(model_dir: str) -> Starlette:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    jobs: asyncio.Queue = asyncio.Queue()

    def generate(prompt_ids: list[int], max_tokens: int, out: asyncio.Queue,
                 loop: asyncio.AbstractEventLoop) -> dict[str, int]:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                    do_sample=False, streamer=_QueueStreamer(tokenizer, loop, out))
        new = output[0, len(prompt_ids):].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        count = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                "total_tokens": len(prompt_ids) + count}

    async def consumer() -> None:
        loop = asyncio.get_running_loop()
        while True:
            prompt_ids, max_tokens, out = await jobs.get()
            try:
                usage = await loop.run_in_executor(executor, generate, prompt_ids, max_tokens, out, loop)
                out.put_nowait(usage)
            except Exception as exc:  # noqa: BLE001 - report to the one request, keep serving
                out.put_nowait(exc)
            out.put_nowait(_DONE)

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def chat(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out: asyncio.Queue = asyncio.Queue()
        await jobs.put((prompt_ids, int(body.get("max_tokens") or 64), out))
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.get("model", "")

        def sse(choices: list[dict], usage: dict | None = None) -> str:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        async def events():
            yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
            usage = None
            while (item := await out.get()) is not _DONE:
                if isinstance(item, Exception):
                    yield f"data: {json.dumps({'error': {'message': str(item)}})}\n\n"
                elif isinstance(item, dict):
                    usage = item
                else:
                    yield sse([{"index": 0, "delta": {"content": item}}])
            if usage is not None:
                finish = "length" if usage["completion_tokens"] >= int(body.get("max_tokens") or 64) \
                    else "stop"
                yield sse([{"index": 0, "delta": {}, "finish_reason": finish}])
                yield sse([], usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        task = asyncio.get_running_loop().create_task(consumer())
        yield
        task.cancel()

    return Starlette(routes=[Route("/health", health),
                             Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--port", type=int, required=True)
    opts = parser.parse_args(argv)
    uvicorn.run(create_app(opts.model), host="127.0.0.1", port=opts.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
