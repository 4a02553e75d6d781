"""srt/vtt cues of a transcript (issue "Reliability under abuse"): every segment lasts some time, none
starts before the previous one ends, all lie within the audio, and no text is lost on the way.

The demo Whisper's random weights place timestamps anywhere in its 30 s window, far past the end of a
short clip; clamped one by one to the clip, every segment after the first used to become a zero-length
cue at the clip's end (``00:00:05,959 --> 00:00:05,959``).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from app.config import TranscriptionModelSpec
from app.serving.audio import collect_transcript, srt, transcript_chunks, transcription_request, vtt
from deployments.engines.records import Segment, WhisperOutput
from deployments.engines.whisper import timed_segments

CUE = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d{3}) --> (\d\d):(\d\d):(\d\d)[,.](\d{3})")


def raw(start: float, end: float, text: str, tokens: int = 2) -> Segment:
    """A segment as generate() gives it: the decoder's times, no words yet."""
    return Segment(start, end, text, list(range(tokens)), -0.5, 1.0)


def assert_cues(segments: list[Segment], duration: float) -> None:
    previous_end = 0.0
    for seg in segments:
        assert previous_end <= seg.start < seg.end <= round(duration, 3), segments
        assert seg.start == round(seg.start, 3) and seg.end == round(seg.end, 3)
        if seg.words:
            assert seg.words[0][1] == seg.start and seg.words[-1][2] == pytest.approx(seg.end, abs=1e-3)
        previous_end = seg.end


def cue_times(text: str) -> list[tuple[float, float]]:
    def seconds(h, m, s, ms):
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000
    return [(seconds(*c[:4]), seconds(*c[4:])) for c in CUE.findall(text)]


def test_the_demo_pattern_becomes_one_cue_per_stretch_of_audio():
    """What the demo Whisper gave for a 5.959 s clip: times up to 58.98 s."""
    segments = [raw(0.04, 0.56, " a"), raw(0.56, 20.28, " b"), raw(25.62, 28.7, " c"), raw(28.7, 28.72, " d"),
                raw(29.16, 29.56, " e"), raw(29.78, 58.26, " f"), raw(58.26, 58.98, " g")]
    timed = timed_segments(segments, 5.959)
    assert [(s.start, s.end, s.text) for s in timed] == [(0.04, 0.56, " a"), (0.56, 5.959, " b c d e f g")]
    assert_cues(timed, 5.959)
    assert timed[1].tokens == [0, 1] * 6 and [w[0] for w in timed[1].words] == list("bcdefg")


@pytest.mark.parametrize("segments,duration,expected", [
    # In the audio and in order: unchanged.
    ([raw(0.0, 1.5, " x"), raw(1.5, 3.0, " y")], 3.0, [(0.0, 1.5, " x"), (1.5, 3.0, " y")]),
    # A timeless segment joins the one before it.
    ([raw(0.0, 1.0, " x"), raw(1.0, 1.0, " y"), raw(1.0, 2.0, " z")], 3.0, [(0.0, 1.0, " x y"), (1.0, 2.0, " z")]),
    # ... or, first of all, the one after it (from where it started).
    ([raw(0.5, 0.5, " x"), raw(1.0, 2.0, " y")], 3.0, [(0.5, 2.0, " x y")]),
    # A segment that starts before the previous one ended starts where it ended.
    ([raw(0.0, 2.0, " x"), raw(1.0, 2.5, " y")], 3.0, [(0.0, 2.0, " x"), (2.0, 2.5, " y")]),
    # Backwards times: timeless, joined.
    ([raw(0.0, 2.0, " x"), raw(1.8, 1.2, " y")], 3.0, [(0.0, 2.0, " x y")]),
    # Everything past the end of the audio: one segment over the whole clip.
    ([raw(10.0, 12.0, " x"), raw(12.0, 14.0, " y")], 4.0, [(0.0, 4.0, " x y")]),
    # Times finer than a millisecond at the end: no cue rounds to nothing.
    ([raw(0.0, 3.9996, " x"), raw(3.9996, 4.2, " y")], 3.99971, [(0.0, 4.0, " x y")]),
    # Nothing to time at all.
    ([raw(0.0, 1.0, " x")], 0.0, []),
    ([], 5.0, []),
])
def test_timed_segments(segments, duration, expected):
    timed = timed_segments(segments, duration)
    assert [(s.start, s.end, s.text) for s in timed] == expected
    assert_cues(timed, duration)


def test_srt_and_vtt_cues_of_an_engine_output_are_valid():
    segments = timed_segments([raw(0.64, 4.2, " one"), raw(28.7, 28.72, " two"), raw(29.16, 29.56, " three")],
                              4.0)
    out = WhisperOutput(language="en", language_name="english", duration=4.0, segments=segments)

    async def collect(fmt):
        async def outputs():
            yield [out]
        request = transcription_request("transcribe", {"model": "w", "response_format": fmt})
        return await collect_transcript(request)(transcript_chunks(outputs()))

    for fmt, render in (("srt", srt), ("vtt", vtt)):
        text = render(asyncio.run(collect(fmt)))
        assert cue_times(text) == [(0.64, 4.0)] and "one two three" in text


@pytest.fixture(scope="module")
def engine():
    from deployments.models.loader import load_whisper_engine

    return load_whisper_engine(TranscriptionModelSpec(id="w", source="demo:whisper", task="transcription"))


def test_the_demo_whisper_gives_valid_cues(engine):
    from tests.unit.test_whisper_engine import settings, voice

    for seconds, seed in [(4.0, 0), (5.959, 3), (41.0, 1)]:
        out = engine.transcribe([engine.prepare(voice(seconds, seed), settings(engine, language="en"))])[0]
        assert out.segments
        assert_cues(out.segments, seconds)
