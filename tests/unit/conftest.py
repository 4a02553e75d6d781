import asyncio

import pytest

from app.config import ModelSpec


@pytest.fixture(scope="session")
def demo_engine_factory():
    """Load the demo chat model into a fresh engine (engines hold per-event-loop state)."""
    from deployments.loader import load_chat_engine

    spec = ModelSpec(id="demo-chat", source="demo:chat")
    cached = load_chat_engine(spec)

    def make(**kwargs):
        from deployments.engine import GenerationEngine

        return GenerationEngine(cached.model, cached.tokenizer, device=cached.device,
                                eos_token_ids=cached.eos_token_ids, pad_token_id=cached.pad_token_id,
                                **kwargs)

    return make


async def collect(engine, requests):
    """Run requests through engine.generate as one group; return per request its list of deltas."""
    out = [[] for _ in requests]
    async for step in engine.generate(requests):
        for i, item in enumerate(step):
            if isinstance(item, BaseException):
                out[i] = item
            elif item and isinstance(out[i], list):
                out[i].extend(item)
    return out


def text_of(deltas, index=0):
    return "".join(d.text for d in deltas if d.index == index)
