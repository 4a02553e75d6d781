"""Load a model from its spec into an engine: the default engine factories of the deployments.

Each factory resolves the spec's ``source`` (:mod:`deployments.models.sources`), picks the device and
dtype, loads the checkpoint with transformers and wraps it in its task's engine. Deployments take the
factory as an argument, so tests inject others.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from app.config import (ChatModelSpec, EmbeddingModelSpec, GenerationLimits, PipelineModelSpec,
                        TranscriptionModelSpec, _ModelSpecBase)
from deployments.engines.base import FROM_PRETRAINED_LOCK, on_passing_thread
from deployments.engines.embedding import EmbeddingEngine
from deployments.engines.embedding_recipe import max_input_length, read_recipe
from deployments.engines.fast_decode import FAMILIES, packs_weights
from deployments.engines.generation import GenerationEngine
from deployments.engines.pipeline import PipelineEngine
from deployments.engines.pipeline_heads import HEADS
from deployments.engines.product_kernel import available as kernel_available
from deployments.engines.whisper import WhisperEngine
from deployments.models.load_log import LoadLog
from deployments.models.processors import load_processor
from deployments.models.quantization import METHODS, prequantized, quantized_weight_bytes
from deployments.models.sources import resolve_source


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(spec: _ModelSpecBase) -> torch.device:
    """CUDA when asked for or when this process was given a GPU, else CPU."""
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(spec: _ModelSpecBase, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_vision_language(path: Path, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint is an image-text-to-text model (transformers' AutoModelForImageTextToText
    maps its config), i.e. a vision-language model served with its processor."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    mapped = getattr(config, "auto_map", None) or {}
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or (
        trust_remote_code and "AutoModelForImageTextToText" in mapped)


@on_passing_thread
def load_chat_engine(spec: ChatModelSpec) -> GenerationEngine:
    """A :class:`GenerationEngine` over any transformers causal LM with a chat template, or any
    image-text-to-text (vision-language) model with its processor."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    method = METHODS[spec.quantization]
    method.check_installed(spec.quantization)  # before minutes of reading weights
    log = LoadLog(spec.id, spec.task)
    path = resolve_source(spec.source, spec.revision, spec.gguf_file)
    log.resolved(spec.source, path)
    device = pick_device(spec)
    dtype = pick_dtype(spec, device)
    stored = prequantized(path)
    if stored is not None and spec.quantization != "none":
        raise ValueError(f"model {spec.id!r}: the checkpoint at {path} is already quantized ({stored}); "
                         f"remove `quantization: {spec.quantization}`")
    processor = None
    if is_vision_language(path, spec.trust_remote_code):
        processor = load_processor(path, trust_remote_code=spec.trust_remote_code)
        tokenizer = processor.tokenizer
        # A VLM's template often lives with its processor (chat_template.jinja), not its tokenizer.
        tokenizer.chat_template = tokenizer.chat_template or getattr(processor, "chat_template", None)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if not tokenizer.chat_template:
        raise ValueError(f"model {spec.id!r}: the tokenizer at {path} has no chat template; set "
                         "`chat_template` in the model's config")
    quantized = stored is not None or method.weight_bytes is not None
    # Quantized weights are placed on the device as they load (bitsandbytes quantizes when it moves them
    # there, and refuses a later .to()).
    placement = {"device_map": device.type} if quantized and method.after_load is None else {}
    with FROM_PRETRAINED_LOCK:
        auto_class = AutoModelForImageTextToText if processor is not None else AutoModelForCausalLM
        model = auto_class.from_pretrained(path, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                           **method.load_kwargs(dtype), **placement)
    log.step(f"weights read as {dtype}")
    if not placement:
        model.to(device)
    if method.after_load is not None:
        method.after_load(model)
    model.eval()
    log.step(f"on {device}" + (f", quantized ({stored or spec.quantization})" if quantized else ""))
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    engine = GenerationEngine(model, tokenizer, device=device, eos_token_ids=eos_ids, pad_token_id=pad,
                              context_len=context_length(spec.limits, model.config, tokenizer),
                              max_running_rows=spec.batching.max_running_rows,
                              max_prefill_tokens=spec.batching.max_prefill_tokens,
                              prefill_threads=spec.prefill_threads, decode_threads=spec.decode_threads,
                              fast_decode=spec.fast_decode and not quantized, packed_weights=spec.packed_weights,
                              product_kernel=spec.product_kernel, tool_parser=spec.tool_parser,
                              processor=processor)
    log.done("engine built" + (": transformers forward (quantized)" if quantized else "")
             + (f", vision-language ({type(model).__name__}): takes images" if processor is not None else ""))
    return engine


def context_length(limits: GenerationLimits, config, tokenizer) -> int:
    """The configured context length, else the model's max_position_embeddings, else the tokenizer's."""
    if limits.max_context_len is not None:
        return limits.max_context_len
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None) or getattr(config.get_text_config(), name, None)
        if value:
            return int(value)
    return int(tokenizer.model_max_length)


@on_passing_thread
def load_whisper_engine(spec: TranscriptionModelSpec) -> WhisperEngine:
    """A :class:`WhisperEngine` over any transformers Whisper checkpoint (local dir or hub cache)."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    log = LoadLog(spec.id, spec.task)
    path = resolve_source(spec.source, spec.revision)
    log.resolved(spec.source, path)
    device = pick_device(spec)
    dtype = pick_dtype(spec, device)
    if device.type == "cuda" and spec.dtype == "auto":
        dtype = torch.float16 if dtype == torch.float32 else dtype
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    with FROM_PRETRAINED_LOCK:
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
    log.step(f"weights read as {dtype}")
    model.to(device).eval()
    engine = WhisperEngine(model, processor, device=device, dtype=dtype,
                           max_new_tokens=spec.audio.max_new_tokens_per_window,
                           max_windows_per_batch=spec.audio.max_windows_per_batch)
    log.done(f"on {device}, engine built")
    return engine


@on_passing_thread
def load_embedding_engine(spec: EmbeddingModelSpec) -> EmbeddingEngine:
    """An :class:`EmbeddingEngine` over any transformers ``AutoModel`` checkpoint, pooled and normalised as
    its sentence-transformers files say (``deployments/engines/embedding.py``)."""
    from transformers import AutoModel, AutoTokenizer

    log = LoadLog(spec.id, spec.task)
    path = resolve_source(spec.source, spec.revision)
    log.resolved(spec.source, path)
    device = pick_device(spec)
    dtype = pick_dtype(spec, device)
    recipe = read_recipe(path)  # before the weights: an unsupported module fails the load at once
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    with FROM_PRETRAINED_LOCK:
        model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    log.step(f"weights read as {dtype}")
    if model.config.is_encoder_decoder:
        raise ValueError(f"model {spec.id!r}: {type(model).__name__} is an encoder-decoder model; embeddings "
                         "are served from encoder-only or decoder-only checkpoints")
    model.to(device).eval()
    positions = getattr(model.config, "max_position_embeddings", None)
    max_tokens = max_input_length(spec.limits.max_input_tokens, recipe, positions, tokenizer.model_max_length)
    engine = EmbeddingEngine(model, tokenizer, device=device, recipe=recipe, max_input_tokens=max_tokens,
                             max_batch_tokens=spec.batching.max_batch_tokens,
                             matryoshka_dimensions=spec.matryoshka_dimensions)
    log.done(f"on {device}, engine built: {'+'.join(recipe.pooling)} pooling"
             f"{', normalised' if recipe.normalize else ''}, at most {max_tokens} tokens per input")
    return engine


@on_passing_thread
def load_pipeline_engine(spec: PipelineModelSpec) -> PipelineEngine:
    """A :class:`PipelineEngine` for ``spec.task`` over any checkpoint its head's auto class loads
    (fill-mask: ``AutoModelForMaskedLM``; a local directory, a hub id read through the cache, or a demo)."""
    import transformers

    head = HEADS[spec.task]
    log = LoadLog(spec.id, spec.task)
    path = resolve_source(spec.source, spec.revision)
    log.resolved(spec.source, path)
    device = pick_device(spec)
    dtype = pick_dtype(spec, device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    with FROM_PRETRAINED_LOCK:
        model = getattr(transformers, head.auto_class).from_pretrained(
            path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    log.step(f"weights read as {dtype}")
    model.to(device).eval()
    max_tokens = spec.limits.max_input_tokens or input_length(model.config, tokenizer)
    engine = PipelineEngine(model, tokenizer, head, device=device, max_input_tokens=max_tokens,
                            max_batch_tokens=spec.batching.max_batch_tokens)
    log.done(f"on {device}, engine built: at most {max_tokens} tokens per input")
    return engine


def input_length(config, tokenizer) -> int:
    """The longest input a pipeline model takes: the smaller of its position table and the tokenizer's
    model_max_length (RoBERTa has 514 positions for 512 tokens); whichever exists."""
    bounds = [int(n) for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
              if n and n < 10**9]  # transformers' "no limit" model_max_length is ~1e30
    if not bounds:
        raise ValueError("the model's maximum input length is unknown: set limits.max_input_tokens")
    return min(bounds)

# --- on-demand loading (deployments/multiplexed.py): split in two so the pool can make room in between --

def import_model_code() -> None:
    """Resolve transformers' lazy model-loading modules now: on a busy CPU that takes seconds, which a
    replica should spend when it starts rather than in its first request's load."""
    import transformers

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "PreTrainedModel"):
        getattr(transformers, name)


@on_passing_thread
def prepare_chat(spec: ChatModelSpec) -> tuple[Path, int]:
    """Fetch or build ``spec``'s checkpoint (no model in memory yet); return its directory and the bytes
    its weights will take once loaded (file sizes scaled from the stored dtype to the loaded one)."""
    path = resolve_source(spec.source, spec.revision, spec.gguf_file)
    return path, estimate_weight_bytes(path, spec)


def load_prepared_chat(spec: ChatModelSpec, path: Path) -> tuple[GenerationEngine, int]:
    """Load the checkpoint that :func:`prepare_chat` returned; return the engine and its weight bytes."""
    engine = load_chat_engine(spec.model_copy(update={"source": str(path), "gguf_file": None}))
    packed = engine.fast_decoder.packed_bytes if engine.fast_decoder is not None else 0
    return engine, weight_bytes(engine.model) + packed


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared tensors counted once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def estimate_weight_bytes(path: Path, spec: ChatModelSpec) -> int:
    """Weight files' size, scaled from the checkpoint's stored dtype to the dtype the spec loads."""
    files = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    stored = sum(f.stat().st_size for f in files)
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        stored_dtype = DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "", torch.float32)
        family = (config.get("text_config") or {}).get("model_type") or config.get("model_type")  # a VLM's LM
    except (OSError, ValueError):
        stored_dtype, family = torch.float32, None
    device = pick_device(spec)
    target = pick_dtype(spec, device)
    quantized = quantized_weight_bytes(path, spec.quantization, target)
    if quantized is not None:  # the transformers forward: no packed copies
        return quantized
    # Packed weights (fast_decode.FastDecoder, its families on CPU in float32) are a second copy, and the
    # product kernel's panels, where this machine builds it, a third.
    packed = spec.fast_decode and spec.packed_weights and family in FAMILIES and packs_weights(device, target)
    copies = 1 + packed + (packed and spec.product_kernel and kernel_available())
    return int(stored * target.itemsize / stored_dtype.itemsize) * copies
