"""Decode the images of a request's ``image_url`` parts, in the replica, with Pillow.

Why here and not in the ingress: decoding is CPU work proportional to the pixels, and the replica
already runs each request's preprocessing (chat template, tokenizer, image processor) on a worker thread
of its own (``deployments/lanes.py``); the ingress's event loop serves every stream and only moves bytes
(``app/images.py`` fetches web and file URLs there). A decoded image goes straight into the model's
processor, so it never crosses a process boundary as pixels.

Every failure is an :class:`~app.errors.InvalidRequest` naming the part (``messages[i].content[j]``):
broken base64, bytes that are not an image Pillow reads, an image over the pixel limit. The pixel
limit is checked on the header before any pixel is decoded: a small file can decode to gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from app.errors import InvalidRequest


def image_bytes(image: Any, where: str) -> bytes:
    """The encoded image of a part: what the ingress fetched, else the data URL's payload."""
    if image.data is not None:
        return image.data
    _, _, payload = image.url.partition(";base64,")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: the data URL's base64 payload is broken (not valid base64)",
                             param=where, code="invalid_image") from None


def decode_image(image: Any, where: str, max_pixels: int) -> Any:
    """The part's image as an RGB ``PIL.Image`` (first frame of an animation); see the module docstring
    for the errors."""
    from PIL import Image

    data = image_bytes(image, where)
    try:
        with warnings.catch_warnings():  # Pillow warns on big images; the limit below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:  # reads the header only
                width, height = opened.size
                if width * height > max_pixels:
                    raise _too_large(where, f"is {width}x{height} = {width * height} pixels,", max_pixels)
                return _rgb(opened)  # decodes the (first frame's) pixels
    except InvalidRequest:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own check (its frames' sizes) fired first
        raise _too_large(where, f"is larger than Pillow decodes ({exc})", max_pixels) from None
    except Image.UnidentifiedImageError:
        raise InvalidRequest(f"{where}: the data is not an image in a format this server reads; send a PNG, "
                             "JPEG, WebP, GIF or another format Pillow reads", param=where,
                             code="invalid_image") from None
    except Exception as exc:  # Pillow raises many types for truncated or corrupt data
        raise InvalidRequest(f"{where}: the image cannot be decoded ({type(exc).__name__}: {exc})", param=where,
                             code="invalid_image") from None


def _rgb(image: Any) -> Any:
    """``image`` as 8-bit RGB. 16- and 32-bit greyscale (``I;16*``, ``I``) is scaled to 8 bits first:
    Pillow's own conversion clips it at 255, which turns a mid-grey 16-bit PNG white."""
    if image.mode.startswith("I"):
        import numpy as np
        from PIL import Image

        values = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _too_large(where: str, size: str, max_pixels: int) -> InvalidRequest:
    return InvalidRequest(f"{where}: the image {size} over this model's limit of {max_pixels} pixels "
                          "(limits.max_image_pixels); scale it down", param=where, code="image_too_large")
