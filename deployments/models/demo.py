"""Demo models this project builds itself, offline and deterministically, on first use.

``demo:<name>`` in a model's ``source`` resolves to a directory under the demo cache holding an ordinary
Hugging Face checkpoint (config, safetensors weights, tokenizer, generation config), so the rest of the
server loads it exactly like a real one. Building is deterministic: a byte-level BPE tokenizer trained
with ``tokenizers`` on a fixed in-repo corpus, and a random-init causal LM under a fixed seed. Two
replicas building at once are safe: each builds into a private temporary directory and renames it in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deployments.engines.base import cache_root
from deployments.models.bert_demo import FILL_MASK_DEMO
from deployments.models.demo_tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tokenizer  # noqa: F401
from deployments.models.vlm_demo import VLM_DEMO, VLM_SMOL_DEMO
from deployments.models.whisper_demo import WHISPER_DEMO

_BUILD_LOCK = threading.Lock()

# Bump when a builder's output changes, so stale caches are rebuilt rather than reused.
BUILD_VERSION = 2

def demo_cache_root() -> Path:
    """Where demo checkpoints live: ``demo`` under :func:`~deployments.engines.base.cache_root`."""
    return cache_root() / "demo"


@dataclass(frozen=True)
class CausalLMDemo:
    """A random-init Qwen2-style causal LM with the demo tokenizer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 2048
    max_positions: int = 2048
    # Wider than the usual 0.02 so logits are peaked: greedy decoding of a random model then has clear
    # winners, and batched == unbatched comparisons are not decided by float rounding between near-ties.
    initializer_range: float = 0.2
    seed: int = 0

    def build(self, out: Path) -> None:
        import torch
        from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

        tokenizer = build_tokenizer(self.vocab_size)
        ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_positions, initializer_range=self.initializer_range,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids[2], pad_token_id=ids[0],
            dtype="float32",
        )
        torch.manual_seed(self.seed)
        model = Qwen2ForCausalLM(config).eval()
        model.generation_config = GenerationConfig(eos_token_id=[ids[2], ids[0]], pad_token_id=ids[0],
                                                   do_sample=False, max_new_tokens=64)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


DEMO_MODELS: dict[str, CausalLMDemo] = {
    # Tiny: starts in seconds; the default serve_config and the tests use it.
    "chat": CausalLMDemo(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=176),
    # Big enough (~30M parameters) that compute, not overhead, dominates on a CPU: for bench/.
    "bench": CausalLMDemo(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                          intermediate_size=1408, initializer_range=0.05),
    # On-demand (multiplexed) demo family: distinct seeds and sizes, so tests can tell them apart and
    # exercise load, hit, evict and reload offline. chat-m has ~30M parameters (~120 MB in float32): big
    # enough that freeing it shows in the replica's resident memory.
    "chat-s1": CausalLMDemo(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=176, seed=1),
    "chat-s2": CausalLMDemo(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                            intermediate_size=256, seed=2),
    "chat-m": CausalLMDemo(hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=4,
                           intermediate_size=1408, initializer_range=0.05, seed=3),
    "whisper": WHISPER_DEMO,  # speech-to-text: deployments/whisper_demo.py
    "fill-mask": FILL_MASK_DEMO,  # a masked LM (BERT): deployments/models/bert_demo.py
    "vlm": VLM_DEMO,  # image-text-to-text, Qwen2-VL: deployments/models/vlm_demo.py
    "vlm-smol": VLM_SMOL_DEMO,  # image-text-to-text, Idefics3 / SmolVLM: deployments/models/vlm_demo.py
}


def demo_path(name: str, builders: dict[str, CausalLMDemo] | None = None) -> Path:
    """Return the directory of demo model ``name``, building it first if it is not cached."""
    builders = DEMO_MODELS if builders is None else builders
    if name not in builders:
        raise KeyError(f"unknown demo model {name!r}; known: {', '.join(sorted(builders))}")
    target = demo_cache_root() / f"{name}-v{BUILD_VERSION}"
    if (target / "config.json").exists():
        return target
    with _BUILD_LOCK:  # builds seed torch's process-global RNG: one at a time per process
        if (target / "config.json").exists():
            return target
        return build_atomically(target, builders[name].build)


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a temporary directory beside ``target`` and rename it into place: a crash leaves
    nothing half-written, and a builder that loses a race to another process keeps the winner's copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
