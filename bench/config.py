"""The bench config (``bench/config.yaml``), validated with pydantic; the CLI overrides its fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from app.config import ChatBatchingSpec

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
RESULTS_DIR = Path(__file__).with_name("results")


def write_result(name: str, text: str) -> None:
    """Write a bench's report to bench/results/``name`` and print it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / name).write_text(text)
    print(text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptSpec(_Strict):
    """How the reproducible prompt set is drawn (see bench/prompts.py)."""

    seed: int = Field(0, description="Seed of the prompt generator: same seed, same prompts.")
    # (share, min words, max words) per length bucket: mostly short chats, some long contexts.
    buckets: list[tuple[float, int, int]] = Field(
        default=[(0.6, 8, 32), (0.3, 64, 160), (0.1, 256, 400)],
        description="Length mix: (share of requests, min words, max words) per bucket.")
    system_share: float = Field(0.5, ge=0, le=1, description="Share of requests with a system message.")


# The two prompt mixes of the headline: short chat turns (the shape of most chat traffic, where the
# serving path's cost per token shows) and the prefill-heavy mix (long contexts among short ones).
DEFAULT_MIXES = {
    "short": PromptSpec(buckets=[(1.0, 2, 14)], system_share=0.0),  # 13-35 prompt tokens
    "mixed": PromptSpec(),  # ~130 prompt tokens on average (23-530)
}


class OursSpec(_Strict):
    """How contenders (a) and (b), this server, are started (bench/serve_ours.py)."""

    ray_num_cpus: int = Field(4, ge=1, description="Logical CPUs of the private Ray instance.")
    batching: ChatBatchingSpec = Field(
        default=ChatBatchingSpec(max_batch_size=8, batch_wait_timeout_s=0.0, max_running_rows=64),
        description="ChatBatchingSpec of contender (a).")
    prefill_threads: int | None = Field(2, ge=1, description=(
        "ChatModelSpec.prefill_threads of (a) and (b), as serve_config.yaml's demo-chat model."))
    decode_threads: int | None = Field(2, ge=1, description=(
        "ChatModelSpec.decode_threads of (a) and (b), as serve_config.yaml's demo-chat model."))
    diagnostic_decode_threads: int = Field(1, ge=1, description=(
        "decode_threads of the diagnostic contender ours-t1 (same batching as (a))."))
    batching_bs1: ChatBatchingSpec = Field(
        default=ChatBatchingSpec(max_batch_size=1, batch_wait_timeout_s=0.0, max_running_rows=1),
        description="ChatBatchingSpec of contender (b): one request at a time.")
    model_id: str = Field("bench", description="The model id clients send.")
    env: dict[str, str] = Field(default={"RAY_worker_niceness": "0"}, description=(
        "Env vars of the Ray instance of (a) and (b). Ray starts its workers (replicas, proxy) at nice 15 "
        "by default; the load generator and every other contender run at nice 0 on the same CPUs, so on a "
        "shared machine the default would starve only our server. 0 makes the comparison even."))
    tuned_env: dict[str, str] = Field(default={"OMP_NUM_THREADS": "2"}, description=(
        "Extra env vars (on top of `env`) for the diagnostic contender ours-env (same batching as (a)): Ray "
        "sets OMP_NUM_THREADS to the actor's num_cpus (1 for the model replica), so torch in the "
        "replica computes on one thread unless this overrides it."))


class BenchConfig(_Strict):
    model: str = Field("demo:bench", description=(
        "The model every contender loads: any source the server takes (demo:<name>, package:<module>, a "
        "local checkpoint directory or .gguf file; see bench.config.model_dir)."))
    levels: list[int] = Field(default=[1, 8, 32], min_length=1,
                              description="Concurrent streaming clients, one measured level each.")
    mixes: dict[str, PromptSpec] = Field(default_factory=lambda: dict(DEFAULT_MIXES), min_length=1,
                                         description="Prompt mixes, each measured at every level.")
    rounds: int = Field(2, ge=1, description=(
        "Times every contender is started and measured; rounds alternate the contender order (A B C, "
        "then C B A) so that drift of a shared machine falls on all alike. A level's figures pool the "
        "requests of all rounds."))
    contender_levels: dict[str, list[int]] = Field(default={"ours-bs1": [1, 32]}, description=(
        "Levels of slow contenders that only a target needs (else all of `levels`)."))
    contender_mixes: dict[str, list[str]] = Field(default={"ours-bs1": ["short"]}, description=(
        "Mixes of contenders that only a target needs (else all of `mixes`)."))
    requests_per_level: int = Field(16, ge=1, description="At least this many requests per level.")
    rounds_per_client: int = Field(4, ge=1, description=(
        "At least this many requests per client: closed-loop clients with equal max_tokens move in waves, "
        "and with 2 a level of 8 clients lasted about 2.5 s, two waves whose ramp and tail weigh heavily."))
    max_tokens: int = Field(64, ge=1, description="max_tokens of every request (greedy).")
    max_level_seconds: float = Field(180, ge=0, description=(
        "Stop issuing new requests after this long in one level (0 = never); the level then reports the "
        "requests it finished, a prefix of the same prompt list."))
    warmup_requests: int = Field(2, ge=0, description="Unmeasured requests sent before the first level.")
    contenders: list[str] = Field(
        default=["ours", "ours-bs1", "tf-serve-cb", "engine", "offline", "ours-t1", "engine-t1"], min_length=1,
        description="Contenders to run, keys of bench.contenders.CONTENDERS; ours-t1 and engine-t1 measure "
                    "the serving path with a core of its own (the 1-thread targets).")
    ours: OursSpec = Field(default_factory=OursSpec)
    startup_timeout_s: float = Field(300, description="How long a contender may take to become healthy.")

    def requests_at(self, level: int) -> int:
        return max(self.requests_per_level, self.rounds_per_client * level)

    def plan(self, key: str) -> list[tuple[str, int]]:
        """The (mix, level) pairs contender ``key`` is measured at."""
        mixes = [m for m in self.mixes if m in self.contender_mixes.get(key, self.mixes)]
        levels = [c for c in self.levels if c in self.contender_levels.get(key, self.levels)]
        return [(m, c) for m in mixes for c in levels]


def load_config(path: Path | str = DEFAULT_CONFIG, **overrides: Any) -> BenchConfig:
    """Read the YAML config and apply ``overrides`` (fields left as None are not overridden)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig.model_validate(data)


def model_dir(source: str) -> Path:
    """The checkpoint directory of ``source``: any source the server takes (``demo:<name>``, built offline
    on first use; ``package:<module>[/<subdir>]``; a local directory; a ``.gguf`` file, converted once into
    a cached float checkpoint), resolved as the server resolves it, so every contender loads the same
    weights (``transformers serve`` gets this directory)."""
    from deployments.models.sources import resolve_source

    path = resolve_source(source)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{source}: resolved to {path}, which holds no checkpoint (config.json)")
    return path
