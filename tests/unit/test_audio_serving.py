"""app.serving.audio (events, collect, formatters, form parsing) and WhisperDeployment with a fake engine."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.config import TranscriptionModelSpec
from app.errors import InvalidRequest, RequestTooLarge
from app.serving.audio import (FORMATTERS, collect_transcript, dump_event, read_upload, srt,
                               transcript_chunks, transcription_request, vtt)
from deployments.engines.audio import encode_audio
from deployments.engines.records import Segment, WhisperOutput
from deployments.engines.whisper import AudioJob, DecodeSettings, words_of
from tests.openapi_schema import assert_valid
from tests.unit.replica_marks import without_replica_time


def output() -> WhisperOutput:
    seg = lambda a, b, text: Segment(a, b, text, [1, 2], -0.5, 1.1, words_of(text, a, b))  # noqa: E731
    return WhisperOutput(language="en", language_name="english", duration=3661.5, temperature=0.0, audio_tokens=1500,
                         segments=[seg(0.0, 1.5, " Hello there."), seg(3600.25, 3661.5, " Bye now")])


async def run(request, out=None):
    async def outputs():
        yield [out or output()]
    return await collect_transcript(request)(transcript_chunks(outputs()))


def test_stream_events_and_collected_text_agree():
    async def go():
        async def outputs():
            yield [output()]
        return [c async for c in transcript_chunks(outputs())]
    chunks = asyncio.run(go())
    events = [dump_event(c) for c in chunks]
    for e in events[:-1]:
        assert_valid(e, "TranscriptTextDeltaEvent")
    assert_valid(events[-1], "TranscriptTextDoneEvent")
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"] == "Hello there. Bye now"
    assert events[-1]["usage"]["input_token_details"]["audio_tokens"] == 1500


def test_every_format_renders_the_collected_transcript():
    req = transcription_request("transcribe", {"model": "w", "response_format": "verbose_json",
                                               "timestamp_granularities": ["word", "segment"]})
    t = asyncio.run(run(req))
    body = json.loads(FORMATTERS["verbose_json"](t).body)
    assert_valid(body, "CreateTranscriptionResponseVerboseJson")
    assert body["language"] == "english" and body["duration"] == 3661.5
    assert [w["word"] for w in body["words"]] == ["Hello", "there.", "Bye", "now"]
    assert body["words"][0]["start"] == 0.0 and body["words"][1]["end"] == 1.5
    assert json.loads(FORMATTERS["json"](t).body)["text"] == "Hello there. Bye now"
    assert FORMATTERS["text"](t).body == b"Hello there. Bye now\n"
    assert srt(t) == ("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
                      "2\n01:00:00,250 --> 01:01:01,500\nBye now\n\n")
    assert vtt(t).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n01:00:00.250")
    assert FORMATTERS["vtt"](t).media_type == "text/vtt"


def test_translation_verbose_json_is_english_and_valid():
    t = asyncio.run(run(transcription_request("translate", {"model": "w", "response_format": "verbose_json"})))
    body = json.loads(FORMATTERS["verbose_json"](t).body)
    assert_valid(body, "CreateTranslationResponseVerboseJson")
    assert body["language"] == "english" and "words" not in body


def test_form_fields_are_validated_with_the_field_named():
    req = transcription_request("transcribe", {"model": "w", "temperature": "0.5", "stream": "true",
                                               "language": "", "timestamp_granularities": []})
    assert req.temperature == 0.5 and req.stream and req.language is None
    assert req.timestamp_granularities == ["segment"]
    for field, value in [("temperature", "hot"), ("response_format", "docx"), ("temperature", "1.5"),
                         ("timestamp_granularities", ["char"])]:
        with pytest.raises(InvalidRequest) as info:
            transcription_request("transcribe", {"model": "w", field: value})
        assert info.value.param.startswith(field)


def test_upload_limit_is_a_413():
    class Upload:
        def __init__(self, data):
            self.data = data

        async def read(self, n):
            return self.data[:n]
    assert asyncio.run(read_upload(Upload(b"x" * 10), 10)) == b"x" * 10
    with pytest.raises(RequestTooLarge) as info:
        asyncio.run(read_upload(Upload(b"x" * 11), 10))
    assert info.value.status_code == 413


class FakeEngine:
    """Records the batches it is given; returns one segment naming the job's duration."""

    multilingual, lang_to_id, max_new_tokens = True, {"<|en|>": 1}, 8
    windows_decoded = 0

    def __init__(self):
        self.batches = []

    def prepare(self, samples, settings: DecodeSettings) -> AudioJob:
        return AudioJob(features=None, num_frames=0, duration=len(samples) / 16000, settings=settings)

    def submit(self, jobs):
        self.batches.append(len(jobs))
        return [self._stream(WhisperOutput(language="en", language_name="english", duration=j.duration,
                                           segments=[Segment(0, j.duration, f" {j.duration:g}s", [5], 0.0, 1.0)]))
                for j in jobs]

    @staticmethod
    async def _stream(output):
        yield [output]

    def apply(self, batching):
        pass


def test_deployment_batches_concurrent_requests_with_an_injected_engine(monkeypatch):
    from ray.serve import batching

    from deployments.whisper import WhisperDeployment

    # Outside a replica @serve.batch cannot look up max_ongoing_requests for its size warning.
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)

    spec = TranscriptionModelSpec(id="w", source="unused", task="transcription",
                     batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.2})
    engine = FakeEngine()
    deployment = WhisperDeployment.func_or_class(spec, engine_factory=lambda s: engine)
    request = transcription_request("transcribe", {"model": "w", "language": "en"})
    clips = [encode_audio(__import__("numpy").zeros(16000 * (i + 1), "float32"), "wav") for i in range(4)]

    async def one(data):
        lists = without_replica_time([batch async for batch in deployment.transcribe(request, data)])
        return [out for batch in lists for out in batch]

    async def main():
        return await asyncio.gather(*(one(c) for c in clips))
    results = asyncio.run(main())
    assert engine.batches == [4]
    assert [r[0].segments[0].text for r in results] == [" 1s", " 2s", " 3s", " 4s"]
    with pytest.raises(InvalidRequest):
        asyncio.run(one(b"junk" * 50))
