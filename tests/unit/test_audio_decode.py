"""deployments.engines.audio: PyAV decoding of every upload format to 16 kHz mono, and its errors."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from app.errors import InvalidRequest
from deployments.engines.audio import SAMPLE_RATE, decode_audio, encode_audio


def tone(seconds: float, freq: float = 440.0, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg", "m4a", "webm"])
def test_every_format_decodes_to_16k_mono_of_the_right_length(fmt):
    samples = decode_audio(encode_audio(tone(2.5), fmt))
    assert samples.dtype == np.float32 and samples.ndim == 1
    # Lossy codecs add a few ms of priming/padding; AAC the most (a 1024-sample priming frame plus
    # the last frame's padding, which the ipod muxer does not trim).
    assert abs(len(samples) / SAMPLE_RATE - 2.5) < (0.15 if fmt == "m4a" else 0.05)
    assert 0.2 < np.abs(samples).max() < 0.4  # the tone's amplitude survives


def test_lossless_round_trip_is_exact_up_to_quantisation():
    x = tone(1.0)
    assert np.allclose(decode_audio(encode_audio(x, "flac")), x, atol=1e-4)


def test_stereo_44k1_is_downmixed_and_resampled():
    rate = 44_100
    left, right = tone(2.0, 300, rate), tone(2.0, 300, rate)
    pcm = (np.stack([left, right], axis=1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    samples = decode_audio(buf.getvalue())
    assert abs(len(samples) - 2 * SAMPLE_RATE) <= 32
    assert 0.25 < np.abs(samples).max() < 0.35  # mean of equal channels, not their sum


@pytest.mark.parametrize("data, code", [
    (b"", "invalid_audio"),
    (b"definitely not audio " * 100, "invalid_audio"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "invalid_audio"),
])
def test_undecodable_input_is_a_400_naming_the_file(data, code):
    with pytest.raises(InvalidRequest) as info:
        decode_audio(data)
    assert info.value.param == "file" and info.value.code == code and info.value.status_code == 400


def test_audio_longer_than_the_limit_is_refused():
    with pytest.raises(InvalidRequest) as info:
        decode_audio(encode_audio(tone(3.0), "wav"), max_duration_s=2.0)
    assert info.value.code == "audio_too_long"
    assert len(decode_audio(encode_audio(tone(3.0), "wav"), max_duration_s=5.0)) == 3 * SAMPLE_RATE
