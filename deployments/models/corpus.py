"""The fixed text the demo models' tokenizers are trained on (no download, deterministic)."""

from __future__ import annotations

_CORPUS_SEED = """\
The quick brown fox jumps over the lazy dog. A server answers requests; a model predicts the next token.
Ray Serve runs deployments as replicas, and each replica holds one copy of the weights.
Hello! How are you today? I am fine, thank you. What can I help you with? Tell me a story about a robot.
Once upon a time there was a small robot who liked to count: one, two, three, four, five, six, seven.
The weather is sunny and warm. Paris is the capital of France. Water boils at 100 degrees Celsius.
def add(a, b):\n    return a + b\nprint(add(2, 3))\n{"role": "user", "content": "hi"}
Batching groups requests so that the accelerator does more useful work per step.
"""


def corpus() -> list[str]:
    """The training text of the demo tokenizers: fixed, so every build gives the same vocabulary."""
    words = sorted(set(_CORPUS_SEED.replace("\n", " ").split()))
    lines = _CORPUS_SEED.splitlines()
    # Deterministic extra text so the BPE vocabulary has common English pieces and numbers.
    extra = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
    numbers = [" ".join(str(i * k) for k in range(1, 10)) for i in range(50)]
    return lines * 20 + extra + numbers
