"""Decode uploaded audio bytes to 16 kHz mono float32 with PyAV (ffmpeg's libraries, bundled in the wheel).

wav, flac, mp3, ogg/vorbis, ogg/opus, m4a/aac, webm/opus and anything else ffmpeg demuxes are read from
memory; no system ffmpeg is run. Every failure is an :class:`app.errors.InvalidRequest` with a message a
client can act on; nothing of ffmpeg's internals reaches the client beyond its one-line reason.

:func:`decode_audio` is CPU-bound and synchronous: callers on an event loop run it in a thread.
"""

from __future__ import annotations

import io

import numpy as np

from app.errors import InvalidRequest

SAMPLE_RATE = 16_000


def decode_audio(data: bytes, *, sample_rate: int = SAMPLE_RATE, max_duration_s: float | None = None,
                 param: str = "file") -> np.ndarray:
    """Return the first audio stream of ``data`` downmixed to mono and resampled to ``sample_rate``.

    Raises InvalidRequest when ``data`` is empty, is no media ffmpeg can read, has no audio stream,
    decodes to no samples, or (if ``max_duration_s`` is given) decodes to longer than that.
    """
    import av

    if not data:
        raise InvalidRequest("The uploaded audio file is empty.", param=param, code="invalid_audio")
    max_samples = None if max_duration_s is None else int(max_duration_s * sample_rate)
    pieces: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidRequest("The uploaded file contains no audio stream.", param=param,
                                     code="invalid_audio")
            stream = container.streams.audio[0]
            # Keep the channels and average them below: ffmpeg's own downmix scales by -3 dB per channel,
            # librosa (what Whisper checkpoints were evaluated with) takes the mean.
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    total += _append(pieces, out)
                if max_samples is not None and total > max_samples:
                    raise _too_long(max_duration_s, param)
            for out in resampler.resample(None):  # flush the resampler's buffered tail
                total += _append(pieces, out)
    except InvalidRequest:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidRequest(f"The uploaded file could not be decoded as audio ({reason}). Supported "
                             "formats: flac, mp3, mp4, mpeg, mpga, m4a, ogg, opus, wav, webm.",
                             param=param, code="invalid_audio") from None
    if total == 0:
        raise InvalidRequest("The uploaded audio file contains no audio samples.", param=param,
                             code="invalid_audio")
    if max_samples is not None and total > max_samples:
        raise _too_long(max_duration_s, param)
    return np.concatenate(pieces).astype(np.float32, copy=False)


def _append(pieces: list[np.ndarray], frame) -> int:
    planes = frame.to_ndarray()  # planar float: (channels, n)
    samples = planes.mean(axis=0) if planes.shape[0] > 1 else planes.reshape(-1)
    if samples.size:
        pieces.append(samples)
    return int(samples.size)


def _too_long(max_duration_s: float | None, param: str) -> InvalidRequest:
    return InvalidRequest(f"The audio is longer than this model accepts ({max_duration_s:g} s).",
                          param=param, code="audio_too_long")


def encode_audio(samples: np.ndarray, fmt: str, *, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode mono float32 ``samples`` as ``fmt`` (wav, flac, mp3, ogg, m4a, webm) in memory.

    For tests, the bench and examples: fixtures in every upload format without a system ffmpeg.
    """
    import av

    container_format, codec, rate = _ENCODINGS[fmt]
    rate = rate or sample_rate
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.asarray(samples, np.float32).reshape(1, -1), format="flt",
                                           layout="mono")
        frame.sample_rate = sample_rate
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name,
                                      layout="mono", rate=rate,
                                      frame_size=stream.codec_context.frame_size or None)
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# format -> (container, codec, sample rate the codec needs or None for the input's)
_ENCODINGS = {
    "wav": ("wav", "pcm_s16le", None),
    "flac": ("flac", "flac", None),
    "mp3": ("mp3", "libmp3lame", None),
    # The wheel has no usable vorbis encoder (decoding vorbis works): .ogg fixtures carry opus.
    "ogg": ("ogg", "libopus", 48_000),
    "m4a": ("ipod", "aac", None),
    "webm": ("webm", "libopus", 48_000),
}
