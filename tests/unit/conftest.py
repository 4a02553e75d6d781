import asyncio

import pytest

from app.config import ChatModelSpec


@pytest.fixture(scope="session")
def demo_engine_factory():
    """Load the demo chat model into a fresh engine (engines hold per-event-loop state)."""
    from deployments.models.loader import load_chat_engine

    spec = ChatModelSpec(id="demo-chat", source="demo:chat")
    cached = load_chat_engine(spec)

    def make(**kwargs):
        from deployments.engines.generation import GenerationEngine

        return GenerationEngine(cached.model, cached.tokenizer, device=cached.device,
                                eos_token_ids=cached.eos_token_ids, pad_token_id=cached.pad_token_id,
                                **kwargs)

    return make


async def collect(engine, requests):
    """Submit requests as one group; return per request its list of deltas, or the error it raised."""
    async def drain(stream):
        deltas = []
        try:
            async for items in stream:
                deltas.extend(items)
        except Exception as exc:
            return exc
        return deltas

    return list(await asyncio.gather(*(drain(s) for s in engine.submit(requests))))


def text_of(deltas, index=0):
    return "".join(d.text for d in deltas if d.index == index)
