"""/v1/audio/transcriptions and /v1/audio/translations against the session's real Ray Serve.

Audio fixtures are generated here (speech-like signals: voiced harmonics with a syllable envelope and
pauses, encoded with PyAV into every upload format), so no system package or binary blob is needed.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from deployments.engines.audio import SAMPLE_RATE, encode_audio
from tests.conftest import TEST_APP_ARGS
from tests.openapi_schema import assert_valid

MODEL = "demo-whisper"
MAX_UPLOAD = next(m for m in TEST_APP_ARGS["models"] if m["id"] == MODEL)["audio"]["max_upload_bytes"]
FORMATS = ["wav", "mp3", "flac", "ogg", "m4a", "webm"]
MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
        "m4a": "audio/mp4", "webm": "audio/webm"}

pytestmark = pytest.mark.integration


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced 'syllables': a gliding pitch with harmonics, a 4 Hz envelope, and short pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.3 * t) > -0.6)
    return (0.2 * voice * envelope + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory):
    """{format: path} of a 4 s clip in every upload format, plus 'long' (65 s wav)."""
    root = tmp_path_factory.mktemp("audio")
    clip = speechlike(4.0)
    files = {}
    for fmt in FORMATS:
        files[fmt] = root / f"clip.{fmt}"
        files[fmt].write_bytes(encode_audio(clip, fmt))
    files["long"] = root / "long.wav"
    files["long"].write_bytes(encode_audio(speechlike(65.0, seed=1), "wav"))
    files["junk"] = root / "junk.mp3"
    files["junk"].write_bytes(b"this is not audio at all " * 200)
    return files


def post(server, path, files, **data):
    return requests.post(f"{server}/v1/audio/{path}", files=files, data={"model": MODEL, **data},
                         timeout=300)


def upload(path):
    return {"file": (path.name, path.read_bytes(), MIME.get(path.suffix[1:], "application/octet-stream"))}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_container_format_transcribes_to_schema_valid_json(server, audio_files, fmt):
    r = post(server, "transcriptions", upload(audio_files[fmt]), language="en")
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "CreateTranscriptionResponseJson")
    assert body["text"].strip()  # the demo model always produces tokens
    assert body["usage"]["seconds"] == pytest.approx(4.0, abs=0.15)  # m4a adds codec priming


def test_response_formats_agree_on_one_transcript(server, audio_files):
    f = audio_files["wav"]
    as_json = post(server, "transcriptions", upload(f), language="en").json()
    text = post(server, "transcriptions", upload(f), language="en", response_format="text")
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text.strip() == as_json["text"]
    verbose = post(server, "transcriptions", upload(f), language="en", response_format="verbose_json").json()
    assert_valid(verbose, "CreateTranscriptionResponseVerboseJson")
    assert verbose["text"] == as_json["text"] and verbose["language"] == "english"
    assert verbose["duration"] == pytest.approx(4.0, abs=0.01)
    assert verbose["segments"] and "words" not in verbose
    assert "".join(s["text"] for s in verbose["segments"]).strip() == verbose["text"]
    assert_cues([(seg["start"], seg["end"]) for seg in verbose["segments"]], verbose["duration"])
    srt = post(server, "transcriptions", upload(f), language="en", response_format="srt")
    assert srt.status_code == 200 and not srt.headers["content-type"].startswith("application/json")
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+)\n", srt.text)
    assert len(cues) == len(verbose["segments"]) and cues[0][0] == "1"
    assert cues[0][3] == verbose["segments"][0]["text"].strip()
    assert_cues([(clock(a), clock(b)) for _, a, b, _ in cues], verbose["duration"])
    vtt = post(server, "transcriptions", upload(f), language="en", response_format="vtt")
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith("WEBVTT\n\n")
    vtt_cues = re.findall(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n", vtt.text)
    assert len(vtt_cues) == len(cues)
    assert_cues([(clock(a), clock(b)) for a, b in vtt_cues], verbose["duration"])


def clock(text: str) -> float:
    """Seconds of an srt (``HH:MM:SS,mmm``) or vtt (``HH:MM:SS.mmm``) time."""
    h, m, s = text.replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def assert_cues(spans: list[tuple[float, float]], duration: float) -> None:
    """Every cue lasts some time, none starts before the previous one ended, all lie within the audio."""
    previous_end = 0.0
    for start, end in spans:
        assert previous_end <= start < end <= duration + 1e-9, spans
        previous_end = end


def test_word_timestamps_on_request(server, audio_files):
    r = requests.post(f"{server}/v1/audio/transcriptions", files=upload(audio_files["flac"]),
                      data=[("model", MODEL), ("language", "en"), ("response_format", "verbose_json"),
                            ("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment")])
    body = r.json()
    assert_valid(body, "CreateTranscriptionResponseVerboseJson")
    assert body["words"] and body["segments"]
    assert [w["word"] for w in body["words"]] == [w for s in body["segments"] for w in s["text"].split()]
    starts = [w["start"] for w in body["words"]]
    assert starts == sorted(starts) and all(w["start"] <= w["end"] for w in body["words"])


def test_openai_sdk_every_response_format(client, audio_files):
    with open(audio_files["mp3"], "rb") as fh:
        data = fh.read()
    plain = client.audio.transcriptions.create(model=MODEL, file=("a.mp3", data), language="en")
    assert plain.text
    verbose = client.audio.transcriptions.create(model=MODEL, file=("a.mp3", data), language="en",
                                                 response_format="verbose_json",
                                                 timestamp_granularities=["word", "segment"])
    assert verbose.text == plain.text and verbose.words and verbose.segments
    assert verbose.duration == pytest.approx(4.0, abs=0.1)
    for fmt in ("text", "srt", "vtt"):
        out = client.audio.transcriptions.create(model=MODEL, file=("a.mp3", data), language="en",
                                                 response_format=fmt)
        assert isinstance(out, str) and plain.text.split()[0] in out
    translated = client.audio.translations.create(model=MODEL, file=("a.mp3", data))
    assert isinstance(translated.text, str)


def test_stream_events_concatenate_to_the_json_text(server, client, audio_files):
    f = audio_files["webm"]
    expected = post(server, "transcriptions", upload(f), language="en").json()["text"]
    r = requests.post(f"{server}/v1/audio/transcriptions", files=upload(f),
                      data={"model": MODEL, "language": "en", "stream": "true"}, stream=True, timeout=300)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    deltas, done = events[:-1], events[-1]
    for e in deltas:
        assert_valid(e, "TranscriptTextDeltaEvent")
        assert_valid(e, "CreateTranscriptionResponseStreamEvent")
    assert_valid(done, "TranscriptTextDoneEvent")
    assert done["type"] == "transcript.text.done" and done["text"] == expected
    assert "".join(e["delta"] for e in deltas) == expected
    sdk = client.audio.transcriptions.create(model=MODEL, file=("a.webm", f.read_bytes()), language="en",
                                             stream=True)
    sdk_events = list(sdk)
    assert sdk_events[-1].type == "transcript.text.done" and sdk_events[-1].text == expected


def test_translation_is_english_and_schema_valid(server, audio_files):
    r = post(server, "translations", upload(audio_files["ogg"]), response_format="verbose_json")
    body = r.json()
    assert_valid(body, "CreateTranslationResponseVerboseJson")
    assert body["language"] == "english" and body["duration"] == pytest.approx(4.0, abs=0.1)
    assert_valid(post(server, "translations", upload(audio_files["ogg"])).json(),
                 "CreateTranslationResponseJson")


def test_long_audio_comes_back_whole(server, audio_files):
    body = post(server, "transcriptions", upload(audio_files["long"]), language="en",
                response_format="verbose_json").json()
    assert_valid(body, "CreateTranscriptionResponseVerboseJson")
    assert body["duration"] == pytest.approx(65.0, abs=0.01)
    ends = [s["end"] for s in body["segments"]]
    assert max(ends) > 30.0  # timestamps run past the first 30 s window ...
    assert max(ends) <= 65.0  # ... and never past the audio
    assert len(body["segments"]) > 1
    assert_cues([(s["start"], s["end"]) for s in body["segments"]], body["duration"])
    srt = post(server, "transcriptions", upload(audio_files["long"]), language="en", response_format="srt")
    cues = re.findall(r"(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n", srt.text)
    assert len(cues) == len(body["segments"])
    assert_cues([(clock(a), clock(b)) for a, b in cues], body["duration"])


def test_an_upload_above_grpcs_default_message_size_transcribes(server):
    """28 s at 96 kHz: a 5.4 MB wav, more than gRPC's default 4 MiB message between the ingress and the
    Whisper replica (it got a 500 before the configs raised the limit), under the upload limit."""
    data = encode_audio(np.repeat(speechlike(28.0), 96_000 // SAMPLE_RATE), "wav", sample_rate=96_000)
    assert 4 * 1024 * 1024 < len(data) <= MAX_UPLOAD
    r = post(server, "transcriptions", {"file": ("big.wav", data, "audio/wav")}, response_format="verbose_json")
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "CreateTranscriptionResponseVerboseJson")
    assert r.json()["duration"] == pytest.approx(28.0, abs=0.01)


@pytest.mark.parametrize("case", ["junk", "empty", "missing", "bad_format", "bad_language", "too_large"])
def test_bad_requests_get_openai_errors(server, audio_files, case):
    files, data = upload(audio_files["wav"]), {}
    if case == "junk":
        files = upload(audio_files["junk"])
    elif case == "empty":
        files = {"file": ("a.wav", b"", "audio/wav")}
    elif case == "missing":
        files = {"nofile": ("x.txt", b"x", "text/plain")}
    elif case == "bad_format":
        data = {"response_format": "docx"}
    elif case == "bad_language":
        data = {"language": "klingon"}
    elif case == "too_large":
        files = {"file": ("big.wav", b"\0" * (MAX_UPLOAD + 1), "audio/wav")}
    r = post(server, "transcriptions", files, **data)
    assert r.status_code == (413 if case == "too_large" else 400), r.text
    assert_valid(r.json(), "ErrorResponse")
    err = r.json()["error"]
    assert "Traceback" not in err["message"]
    if case in ("junk", "empty"):
        assert err["param"] == "file" and "audio" in err["message"]
    if case == "missing":
        assert err["param"] == "file"
    if case in ("bad_format", "bad_language"):
        assert err["param"] in ("response_format", "language")


def test_chat_model_refuses_audio(server, audio_files):
    r = requests.post(f"{server}/v1/audio/transcriptions", files=upload(audio_files["wav"]),
                      data={"model": "demo-chat"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_task_mismatch"  # as OpenAI: NotFoundError


def test_concurrent_requests_are_batched_and_equal_to_sequential(server, audio_files):
    """Distinct clips sent one by one and then all at once give byte-identical transcripts."""
    clips = [encode_audio(speechlike(2.0 + i, seed=10 + i), "wav") for i in range(6)]

    def one(data):
        r = requests.post(f"{server}/v1/audio/transcriptions", timeout=300,
                          files={"file": ("c.wav", data, "audio/wav")},
                          data={"model": MODEL, "language": "en", "response_format": "verbose_json"})
        assert r.status_code == 200, r.text
        return [(s["start"], s["end"], s["tokens"]) for s in r.json()["segments"]]

    sequential = [one(c) for c in clips]
    with ThreadPoolExecutor(len(clips)) as pool:
        concurrent = list(pool.map(one, clips))
    assert concurrent == sequential
    assert len({str(s) for s in sequential}) > 1  # the clips really differ
