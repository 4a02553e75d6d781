"""Vision-language models in the generation engine: a request's images become model inputs, and enter
the model at prefill only.

One path for every ``AutoModelForImageTextToText`` family, with no per-family code:

- **Preparing** (:func:`with_images`, on the replica's preprocessing thread): the chat template renders
  image parts as the family's placeholder (its own template decides where), and the checkpoint's own
  processor expands the placeholders into the image's tokens and computes the pixel tensors (Qwen2-VL:
  ``pixel_values`` + ``image_grid_thw`` at the image's resolution; SmolVLM/Idefics3: fixed tiles +
  ``pixel_attention_mask``; LLaVA: one resized image). Image tokens are prompt tokens: they count
  against the context like text.
- **Prefill** (:func:`prefill_inputs`, on the model thread): the request's prompt runs alone through the
  model's forward with those tensors (the model embeds the images and merges them into the text), with
  the positions the model lays out for it: a model that has ``get_rope_index`` (multimodal RoPE, the
  Qwen-VL families) places image tokens on a (time, height, width) grid, so its next text position is
  not the token count; :func:`prefill_inputs` returns that position, and decode continues from it.
- **Decode** is the language model's usual step, shared with text rows: with every position component
  equal, multimodal RoPE is plain RoPE, so rows with and without images decode in one batch, and no
  image is computed again after its prefill.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from app.errors import InvalidRequest
from app.images import check_image_count
from deployments.engines.images import decode_image

# Processor outputs that are not model inputs of their own (the prompt ids travel as ``prompt_ids``).
_TEXT_KEYS = frozenset({"input_ids", "attention_mask"})


def takes_images(processor: Any) -> bool:
    """Whether a checkpoint's processor prepares images (a VLM's does; a tokenizer does not)."""
    return getattr(processor, "image_processor", None) is not None


def image_token_id(config: Any) -> int | None:
    """The placeholder token an image expands into (``image_token_id``, older configs ``image_token_index``)."""
    for name in ("image_token_id", "image_token_index"):
        if isinstance(value := getattr(config, name, None), int):
            return value
    return None


def with_images(engine: Any, text: str, images: list[tuple[str, Any]], limits: Any
                ) -> tuple[list[int], dict[str, Any], str]:
    """``(prompt ids, model inputs, note)`` for the rendered prompt ``text`` and its image parts
    (``(where, ImageURL)`` in prompt order). ``note`` says how many prompt tokens the images take, for
    a context-length error. InvalidRequest names the part at fault: a model without images, too many
    images, an image that does not decode or that the processor refuses."""
    processor = engine.processor
    if not takes_images(processor):
        where = images[0][0]
        raise InvalidRequest(f"{where}: this model takes no images (it is a text-only model); send the text "
                             "alone, or use a vision-language model", param=where, code="images_not_supported")
    check_image_count(images, limits.max_images_per_request)
    pictures = [decode_image(image, where, limits.max_image_pixels) for where, image in images]
    try:
        out = processor(text=[text], images=pictures, return_tensors="pt", add_special_tokens=False)
    except Exception as exc:  # a size the image processor refuses, placeholders that do not match
        where = _refused_image(processor, pictures, images)
        raise InvalidRequest(f"{where}: the image cannot be prepared for this model ({exc})", param=where,
                             code="invalid_image") from None
    ids = out["input_ids"][0].tolist()
    inputs = {key: value for key, value in out.items() if key not in _TEXT_KEYS}
    placeholder = engine.image_token_id
    count = sum(1 for t in ids if t == placeholder) if placeholder is not None else 0
    note = f" ({count} of them for {len(images)} image{'s' if len(images) > 1 else ''})" if count else ""
    return ids, inputs, note


def _refused_image(processor: Any, pictures: list[Any], images: list[tuple[str, Any]]) -> str:
    """Where the image the processor refuses on its own is (the first part if each passes alone: then the
    prompt and the images disagree)."""
    for picture, (where, _) in zip(pictures, images):
        try:
            processor.image_processor(images=[picture], return_tensors="pt")
        except Exception:
            return where
    return images[0][0]


@functools.lru_cache(maxsize=64)
def _parameters(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def prefill_inputs(model: Any, ids: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The forward's keyword arguments for one prompt ``ids`` [1, L] with its images (``inputs``: the
    processor's tensors), and the position of the token after the prompt (see the module docstring)."""
    import torch  # here: chat_params imports this module, and app.check imports chat_params

    accepted = _parameters(type(model).forward)
    dtype = model.dtype
    kwargs = {k: v.to(ids.device, dtype) if v.is_floating_point() else v.to(ids.device)
              for k, v in inputs.items() if k in accepted}
    length = ids.shape[1]
    rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    if rope_index is None:
        return {**kwargs, "position_ids": torch.arange(length, device=ids.device)[None]}, length
    wanted = _parameters(rope_index.__func__)
    positions, deltas = rope_index(ids, **{k: v for k, v in kwargs.items() if k in wanted})
    return {**kwargs, "position_ids": positions}, length + int(deltas.reshape(-1)[0])
