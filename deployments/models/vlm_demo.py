"""The built-in demo vision-language checkpoints: built offline and deterministically, like the demo chat model.

Two families, each an ordinary Hugging Face checkpoint directory (config, safetensors weights, tokenizer,
image processor, processor config, chat template, generation config) that the ``Auto`` classes load:

- :class:`Qwen2VLDemo` (``demo:vlm``): ``Qwen2VLForConditionalGeneration``. Dynamic resolution: an image
  becomes ``t*h*w`` flattened 14-pixel patches (``pixel_values``, ``image_grid_thw``), merged 2x2 into
  ``h*w/4`` ``<|image_pad|>`` tokens; the text model uses M-RoPE, whose 3-D positions need the processor's
  ``mm_token_type_ids`` at prefill. ``Qwen2VLProcessor`` in transformers 5.x requires a video processor,
  and so torchvision, to be constructed or loaded: this builder writes its files itself, and
  :func:`deployments.models.processors.load_processor` loads it without torchvision (PyPI's torchvision wheels need CUDA torch).
- :class:`Idefics3Demo` (``demo:vlm-smol``): ``Idefics3ForConditionalGeneration``, the SmolVLM design
  (SmolVLM's model is Idefics3's): an image is resized, cut into fixed-size tiles plus a global view
  (``pixel_values`` of shape ``(batch, tiles, 3, H, W)`` with ``pixel_attention_mask``), each tile encoded and
  pixel-shuffled by ``scale_factor`` into ``image_seq_len`` tokens; the processor expands each ``<image>`` into
  ``<fake_token_around_image><row_i_col_j><image>...`` per tile and ``<global-img>`` for the global view.
  ``SmolVLMProcessor`` is not used because it needs ``num2words`` and a torchvision video processor.

Both reuse the demo chat tokenizer's locally trained BPE (:func:`deployments.models.demo.build_tokenizer`)
plus the family's special tokens, and initialise the text model with a wide ``initializer_range`` so greedy
decoding has clear winners (see :class:`deployments.models.demo.CausalLMDemo`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

QWEN2_VL_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                           "<|video_pad|>"]
IDEFICS3_SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                           *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]

# Renders a message's content: a string as is; a list of parts with images (and image URLs) as Qwen2-VL's
# vision block, videos likewise, text parts as their text; None as nothing.
_QWEN2_VL_CONTENT_MACRO = (
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content %}{% for part in content %}"
    "{% if part['type'] in ['image', 'image_url'] %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] in ['video', 'video_url'] %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}"
)


def qwen2_vl_chat_template() -> str:
    """The demo ChatML template (tools included) with every message content rendered by the macro above:
    for text-only conversations its output is the demo chat model's, character for character."""
    from deployments.models.demo_tokenizer import CHATML_TEMPLATE

    template = CHATML_TEMPLATE
    for old, new in [
        ("messages[0]['content'] + ", "render_content(messages[0]['content']) + "),
        ("(message['content'] or '')", "render_content(message['content'])"),
        ("'\n' + message['content'] + '<|im_end|>'", "'\n' + render_content(message['content']) + '<|im_end|>'"),
    ]:
        if old not in template:  # CHATML_TEMPLATE changed shape: fail the build rather than mis-render
            raise RuntimeError(f"demo ChatML template no longer contains {old!r}")
        template = template.replace(old, new)
    return _QWEN2_VL_CONTENT_MACRO + template


# SmolVLM's chat template (its processor's DEFAULT_CHAT_TEMPLATE), also accepting string and empty content
# and OpenAI's image_url parts. Tools and tool calls are not rendered, as in SmolVLM's own template.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% set content = message['content'] %}"
    "{% if content is string %}{{ ': ' + content }}"
    "{% elif content %}{{ ':' if content[0]['type'] in ['image', 'image_url'] else ': ' }}"
    "{% for part in content %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% else %}{{ ':' }}{% endif %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tokenizer_with(specials: list[str], vocab_size: int, chat_template: str, eos_token: str | None = None):
    """The demo chat tokenizer (ChatML specials, trained BPE) plus ``specials`` and this family's template."""
    from transformers import AddedToken

    from deployments.models.demo_tokenizer import build_tokenizer

    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in specials]})
    tokenizer.chat_template = chat_template
    if eos_token is not None:
        tokenizer.eos_token = eos_token
    return tokenizer


def qwen2_vl_processor_files(out: Path, image_processor, tokenizer, chat_template: str) -> None:
    """Write what ``Qwen2VLProcessor.save_pretrained`` writes, without constructing one.

    transformers 5.x checks every processor attribute's class at construction, and the video processor's
    base class exists only with torchvision installed, so a ``Qwen2VLProcessor`` cannot be built here
    without it. The files are the ones the processor saves: tokenizer files, ``chat_template.jinja`` and a
    ``processor_config.json`` with the sub-processors nested. The video processor entry matters only where
    torchvision is installed (``AutoProcessor`` then loads it); it mirrors the image processor's settings.
    """
    tokenizer.save_pretrained(out)  # also writes chat_template.jinja from the tokenizer's template
    image_config = image_processor.to_dict()
    image_config["image_processor_type"] = "Qwen2VLImageProcessor"  # backend-neutral name, as saved
    video_config = {key: image_config[key] for key in
                    ["size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"]}
    video_config["video_processor_type"] = "Qwen2VLVideoProcessor"
    config = {"image_processor": image_config, "processor_class": "Qwen2VLProcessor",
              "video_processor": video_config}
    (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(chat_template)


@dataclass(frozen=True)
class Qwen2VLDemo:
    """A random-init Qwen2-VL (ViT with 2x2 patch merger, M-RoPE text model) with the demo tokenizer.

    Image tokens: ``(H/28) * (W/28)`` after resizing to multiples of 28 within ``[min_pixels, max_pixels]``
    (256 for a 448x448 image, 4 for 64x64, at least 4).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 176
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # temporal, height, width: sums to head_dim / 2
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_heads: int = 2
    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    vocab_size: int = 2048
    max_positions: int = 4096
    initializer_range: float = 0.2  # wide, as CausalLMDemo's: peaked logits, clear greedy winners
    seed: int = 0

    def build(self, out: Path) -> None:
        import torch
        from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        template = qwen2_vl_chat_template()
        tokenizer = _tokenizer_with(QWEN2_VL_SPECIAL_TOKENS, self.vocab_size, template)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ["<|endoftext|>", "<|im_end|>", *QWEN2_VL_SPECIAL_TOKENS]}
        config = Qwen2VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_positions,
                initializer_range=self.initializer_range,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": list(self.mrope_section)},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
            vision_config=dict(
                depth=self.vision_depth, embed_dim=self.vision_embed_dim, hidden_size=self.hidden_size,
                num_heads=self.vision_heads, mlp_ratio=2, patch_size=self.patch_size, temporal_patch_size=2,
                spatial_merge_size=self.merge_size, initializer_range=self.initializer_range),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True, dtype="float32",
        )
        torch.manual_seed(self.seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
            do_sample=False, max_new_tokens=64)
        model.save_pretrained(out)
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, patch_size=self.patch_size,
            temporal_patch_size=2, merge_size=self.merge_size)
        qwen2_vl_processor_files(out, image_processor, tokenizer, template)


@dataclass(frozen=True)
class Idefics3Demo:
    """A random-init Idefics3 / SmolVLM (SigLIP-style tiles, pixel shuffle, Llama text) with the demo tokenizer.

    Every image is resized to ``longest_edge`` and cut into ``tile`` x ``tile`` crops (3x3 for a square one)
    plus a global view; each crop gives ``(tile / patch_size / scale_factor) ** 2`` ``<image>`` tokens
    (16 here: 160 for a square image of any size).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 176
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    tile: int = 64
    patch_size: int = 8
    scale_factor: int = 2
    longest_edge: int = 192  # at most 3x3 tiles
    vocab_size: int = 2048
    max_positions: int = 4096
    initializer_range: float = 0.2
    seed: int = 0

    @property
    def image_seq_len(self) -> int:
        return (self.tile // self.patch_size // self.scale_factor) ** 2

    def build(self, out: Path) -> None:
        import torch
        from transformers import (GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                                  Idefics3Processor)
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        tokenizer = _tokenizer_with(IDEFICS3_SPECIAL_TOKENS, self.vocab_size, IDEFICS3_CHAT_TEMPLATE,
                                    eos_token="<end_of_utterance>")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ["<|endoftext|>", "<|im_end|>", "<image>", "<end_of_utterance>"]}
        config = Idefics3Config(
            text_config=dict(
                model_type="llama", vocab_size=len(tokenizer), hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                max_position_embeddings=self.max_positions, initializer_range=self.initializer_range,
                rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=ids["<end_of_utterance>"],
                pad_token_id=ids["<|endoftext|>"]),
            vision_config=dict(
                hidden_size=self.vision_hidden_size, intermediate_size=self.vision_intermediate_size,
                num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                image_size=self.tile, patch_size=self.patch_size, initializer_range=self.initializer_range),
            image_token_id=ids["<image>"], scale_factor=self.scale_factor, pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True, dtype="float32",
        )
        torch.manual_seed(self.seed)
        model = Idefics3ForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(
            eos_token_id=[ids["<end_of_utterance>"], ids["<|endoftext|>"], ids["<|im_end|>"]],
            pad_token_id=ids["<|endoftext|>"], do_sample=False, max_new_tokens=64)
        model.save_pretrained(out)
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": self.longest_edge}, max_image_size={"longest_edge": self.tile})
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                      image_seq_len=self.image_seq_len, chat_template=IDEFICS3_CHAT_TEMPLATE)
        processor.save_pretrained(out)


VLM_DEMO = Qwen2VLDemo()
VLM_SMOL_DEMO = Idefics3Demo()
