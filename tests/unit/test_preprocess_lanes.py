"""LLMDeployment's preprocessing lanes (issue #8): a short prompt is templated and tokenized while long
ones hold the other lane, and each lane tokenizes with a tokenizer of its own."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from app.config import ChatModelSpec
from app.protocol.chat import ChatCompletionRequest
from tests.unit.replica_marks import without_replica_time


class _Tokenizer:
    """Tokenizes one id per character; blocks on text longer than ``block_over`` until released."""

    backend_tokenizer = SimpleNamespace(normalizer=None)

    def __init__(self, block_over: int) -> None:
        self.block_over, self.release, self.copies, self.threads = block_over, threading.Event(), 0, set()

    def __deepcopy__(self, memo):
        self.copies += 1
        return self  # one object, so the test sees every lane's calls

    def get_vocab(self):
        return {"a": 0, "bb": 1}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, continue_final_message=False):
        return "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        self.threads.add(threading.current_thread().name.split("_")[0])
        if len(text) > self.block_over:
            assert self.release.wait(30)
        return {"input_ids": [0] * len(text)}


class _Engine:
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.context_len, self.vocab_size, self.admitted = tokenizer, 10**6, 2, []

    def submit(self, requests):
        self.admitted.extend(requests)
        return [self._stream(r) for r in requests]

    async def _stream(self, request):
        yield [len(request.prompt_ids)]

    def apply(self, batching):
        pass

    def stats(self):
        return {}


async def test_a_short_prompt_is_not_queued_behind_long_ones(monkeypatch):
    import deployments.batched as batched
    from deployments.lanes import SMALL_PROMPT_CHARS
    from deployments.llm import LLMDeployment
    from ray.serve import batching

    monkeypatch.setattr(batched, "replica_max_ongoing_requests", lambda: 8)
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    # @serve.batch keeps one queue per decorated function, bound to the event loop that first used it:
    # an earlier test's loop (closed by now) in this process. A replica has one loop; give this test its own.
    monkeypatch.setattr(batched.BatchedDeployment._admit.set_max_batch_size.__self__, "_queue", None)
    tokenizer = _Tokenizer(block_over=SMALL_PROMPT_CHARS)
    engine = _Engine(tokenizer)
    deployment = LLMDeployment.func_or_class(ChatModelSpec(id="m", source="unused"),
                                             engine_factory=lambda s: engine)

    async def answer(text: str) -> list:
        request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": text}], max_tokens=1)
        return without_replica_time([items async for items in deployment.generate(request)])

    longs = [asyncio.create_task(answer("x" * (SMALL_PROMPT_CHARS + 1))) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert await asyncio.wait_for(answer("hi"), timeout=20) == [[2]]  # while the long lane is blocked
    assert not any(task.done() for task in longs)
    tokenizer.release.set()
    assert await asyncio.gather(*longs) == [[[SMALL_PROMPT_CHARS + 1]]] * 3
    assert tokenizer.threads == {"preprocess", "preprocess-small"} and tokenizer.copies == 1
