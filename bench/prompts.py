"""The reproducible prompt set: chat messages of mixed lengths, drawn from a fixed seed.

Words come from a fixed list (mostly pieces the demo tokenizer knows), so a prompt's token count is
stable; lengths follow :attr:`PromptSpec.buckets`. Every contender and every level gets the same list,
request ``i`` always being prompt ``i``.
"""

from __future__ import annotations

import random

from bench.config import PromptSpec

_WORDS = (
    "the quick brown fox jumps over lazy dog a server answers requests model predicts next token ray "
    "serve runs deployments as replicas and each replica holds one copy of weights hello how are you "
    "today I am fine thank what can help with tell me story about robot once upon time there was small "
    "who liked to count two three four five six seven weather is sunny warm paris capital france water "
    "boils at degrees celsius batching groups so that accelerator does more useful work per step"
).split()

_SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are a robot who likes to count.")


def make_prompts(n: int, spec: PromptSpec | None = None) -> list[list[dict[str, str]]]:
    """``n`` chat message lists; the first ``k`` are the same for any ``n >= k`` (a stable prefix)."""
    spec = spec or PromptSpec()
    rng = random.Random(spec.seed)
    shares = [b[0] for b in spec.buckets]
    prompts = []
    for _ in range(n):
        _, lo, hi = rng.choices(spec.buckets, weights=shares)[0]
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))
        messages = []
        if rng.random() < spec.system_share:
            messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        messages.append({"role": "user", "content": words})
        prompts.append(messages)
    return prompts
