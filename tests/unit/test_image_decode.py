"""Decoding a request's images in the replica (deployments/engines/images.py): what decodes, into what, and
how every failure is refused (an InvalidRequest naming the part, code ``invalid_image`` or ``image_too_large``),
fast even for files that declare enormous sizes."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from app.errors import InvalidRequest
from app.protocol.chat import ImageURL
from deployments.engines.images import decode_image

WHERE = "messages[2].content[1]"
LIMIT = 4096 * 4096  # GenerationLimits' default max_image_pixels


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> ImageURL:
    return ImageURL(url=f"data:{mime};base64," + base64.b64encode(data).decode())


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def refused(image: ImageURL, max_pixels: int = LIMIT) -> InvalidRequest:
    """The error decoding ``image`` raises; checks the contract every refusal shares."""
    with pytest.raises(InvalidRequest) as caught:
        decode_image(image, WHERE, max_pixels)
    error = caught.value
    assert error.param == WHERE and error.message.startswith(WHERE), error.message
    assert error.status_code == 400
    return error


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares ``width`` x ``height`` RGB pixels (its data is a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def gif_declaring(width: int, height: int, where: str = "screen") -> bytes:
    """A 1x1 GIF (~40 bytes) patched to declare ``width`` x ``height``: on its logical screen, or on its
    first frame's image descriptor (Pillow grows the image to a frame larger than the screen)."""
    data = bytearray(encoded(Image.new("RGB", (1, 1)), "GIF"))
    at = 6 if where == "screen" else data.index(b",") + 5
    data[at:at + 4] = struct.pack("<HH", width, height)
    return bytes(data)


# --- what decodes --------------------------------------------------------------------------------------

def test_a_data_url_decodes_to_an_rgb_image_of_its_pixels():
    picture = noise(37, 21)
    out = decode_image(data_url(encoded(picture)), WHERE, LIMIT)
    assert out.mode == "RGB" and out.size == (37, 21)
    assert np.array_equal(np.asarray(out), np.asarray(picture))
    jpeg = decode_image(data_url(encoded(picture, "JPEG"), "image/jpeg"), WHERE, LIMIT)
    assert jpeg.mode == "RGB" and jpeg.size == (37, 21)


def test_the_bytes_the_ingress_fetched_win_over_the_url():
    picture = noise(8, 8)
    web = ImageURL(url="https://example.invalid/a.png")
    web.set_data(encoded(picture))
    assert np.array_equal(np.asarray(decode_image(web, WHERE, LIMIT)), np.asarray(picture))
    # Even a data URL whose own payload is broken: what the ingress stored is what is decoded.
    broken = ImageURL(url="data:image/png;base64,@@@@")
    broken.set_data(encoded(picture))
    assert decode_image(broken, WHERE, LIMIT).size == (8, 8)


def test_an_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data_url(data, "image/gif"), WHERE, LIMIT)
    assert out.mode == "RGB" and out.size == (8, 8)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((7, 7)) == (255, 0, 0)


def _palette() -> Image.Image:
    image = Image.new("P", (6, 4))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 6, 4))
    return image


@pytest.mark.parametrize("source, fmt, pixel", [
    (Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),  # JPEG stores CMYK as it is
    (Image.new("LA", (6, 4), (128, 200)), "PNG", (128, 128, 128)),
    (Image.new("L", (6, 4), 77), "PNG", (77, 77, 77)),
    (Image.new("RGBA", (6, 4), (10, 20, 30, 0)), "PNG", (10, 20, 30)),
    (Image.new("I;16", (6, 4), 100 * 257), "PNG", (100, 100, 100)),  # 16-bit values scaled to 8 bits
    (_palette(), "PNG", (255, 0, 0)),
], ids=["CMYK", "LA", "L", "RGBA", "I;16", "P"])
def test_other_modes_become_rgb(source, fmt, pixel):
    data = encoded(source, fmt)
    assert Image.open(io.BytesIO(data)).mode == source.mode  # the file really holds that mode
    out = decode_image(data_url(data), WHERE, LIMIT)
    assert out.mode == "RGB" and out.size == (6, 4)
    assert out.getpixel((3, 2)) == pixel


def test_a_16_bit_greyscale_png_keeps_its_brightness():
    mid_grey = encoded(Image.new("I;16", (4, 4), 32896), "PNG")  # 32896 / 65535 = 128 / 255
    out = decode_image(data_url(mid_grey), WHERE, LIMIT)
    assert abs(out.getpixel((0, 0))[0] - 128) <= 1, out.getpixel((0, 0))


# --- what is refused -----------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", ["@@@@", "abc", "aGk=x", "aGVsbG8 d29ybGQ="])
def test_broken_base64_is_invalid_image(payload):
    error = refused(ImageURL(url="data:image/png;base64," + payload))
    assert error.code == "invalid_image" and "base64" in error.message


@pytest.mark.parametrize("data", [b"hello, this is not an image", b"", b"\x89PNG\r\n\x1a\n",
                                  b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'],
                         ids=["text", "empty", "png-signature-only", "svg"])
def test_bytes_that_are_no_image_are_invalid_image(data):
    error = refused(data_url(data))
    assert error.code == "invalid_image" and "not an image" in error.message


@pytest.mark.parametrize("fmt, keep", [("PNG", 0.5), ("PNG", -100), ("JPEG", 0.5), ("JPEG", 500), ("GIF", 0.5)])
def test_a_truncated_image_is_invalid_image(fmt, keep):
    data = encoded(noise(96, 96), fmt)
    cut = data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    error = refused(data_url(cut))
    assert error.code == "invalid_image" and "cannot be decoded" in error.message


def test_over_max_pixels_is_refused_on_the_header():
    data = png_declaring(5000, 5000)  # 25 M pixels in a ~60-byte file: decoding it would be 75 MB
    assert len(data) < 100
    started = time.perf_counter()
    error = refused(data_url(data), max_pixels=1_000_000)
    assert time.perf_counter() - started < 0.1
    assert error.code == "image_too_large"
    assert "5000x5000" in error.message and "1000000" in error.message and "max_image_pixels" in error.message
    assert decode_image(data_url(encoded(noise(1000, 1000))), WHERE, 1_000_000).size == (1000, 1000)  # at it


@pytest.mark.parametrize("data", [png_declaring(100_000, 100_000), gif_declaring(65535, 65535),
                                  gif_declaring(65535, 65535, "frame"), gif_declaring(8000, 8000),
                                  gif_declaring(8000, 8000, "frame")],
                         ids=["png-10G", "gif-screen-4G", "gif-frame-4G", "gif-screen-64M", "gif-frame-64M"])
def test_bombs_are_image_too_large_and_fast(data):
    """Tiny files declaring billions of pixels: refused before any pixel is decoded, whether our limit or
    Pillow's own decompression-bomb check (at 2 x Image.MAX_IMAGE_PIXELS) sees the size first."""
    assert len(data) < 100
    started = time.perf_counter()
    error = refused(data_url(data))
    assert time.perf_counter() - started < 0.1
    assert error.code == "image_too_large" and str(LIMIT) in error.message


def test_a_bomb_refusal_says_how_big_the_image_is():
    error = refused(data_url(png_declaring(100_000, 100_000)))
    assert "the image is larger than Pillow decodes" in error.message and "10000000000 pixels" in error.message


def test_the_configured_pixel_limit_stays_within_what_pillow_decodes():
    """Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS as bombs: the limit may not promise more."""
    from pydantic import ValidationError

    from app.config import GenerationLimits

    assert GenerationLimits(max_image_pixels=2 * Image.MAX_IMAGE_PIXELS).max_image_pixels == 178_956_970
    with pytest.raises(ValidationError):
        GenerationLimits(max_image_pixels=2 * Image.MAX_IMAGE_PIXELS + 1)
