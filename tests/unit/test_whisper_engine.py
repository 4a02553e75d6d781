"""The demo Whisper checkpoint's layout, and the engine against transformers' own ASR pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import TranscriptionModelSpec
from app.errors import InvalidRequest
from app.protocol.audio import TranscriptionRequest
from deployments.engines.audio import SAMPLE_RATE
from deployments.engines.whisper import to_decode_settings
from deployments.models.loader import load_whisper_engine

SPEC = TranscriptionModelSpec(id="w", source="demo:whisper", task="transcription")


def voice(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(110 + 40 * np.sin(2 * np.pi * rng.uniform(0.2, 1) * t)) / SAMPLE_RATE
    env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t), 0, None)
    return (0.2 * env * sum(np.sin(k * phase) / k for k in range(1, 6))).astype(np.float32)


@pytest.fixture(scope="module")
def engine():
    return load_whisper_engine(SPEC)


def settings(engine, **fields):
    return to_decode_settings(TranscriptionRequest(model="w", **fields), engine, SPEC.audio)


def test_demo_token_layout_is_what_whisper_code_assumes(engine):
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    tok, gen = engine.tokenizer, engine.model.generation_config
    sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
    assert [tok.convert_tokens_to_ids(f"<|{c}|>") for c in LANGUAGES] == list(range(sot + 1, sot + 101))
    assert tok.all_special_ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.all_special_ids[-1] == gen.no_timestamps_token_id == tok.convert_tokens_to_ids("<|notimestamps|>")
    assert tok.convert_tokens_to_ids("<|0.00|>") == gen.no_timestamps_token_id + 1
    assert tok.convert_tokens_to_ids("<|30.00|>") == gen.no_timestamps_token_id + 1501 == len(tok) - 1
    assert gen.lang_to_id["<|fr|>"] == tok.convert_tokens_to_ids("<|fr|>")
    assert gen.task_to_id == {"transcribe": tok.convert_tokens_to_ids("<|transcribe|>"),
                              "translate": tok.convert_tokens_to_ids("<|translate|>")}
    assert gen.max_new_tokens and gen.is_multilingual
    # The tokenizer's own prefix logic (which derives language ids by position) agrees.
    assert tok.get_decoder_prompt_ids(task="transcribe", language="de")[0][1] == gen.lang_to_id["<|de|>"]
    assert engine.processor.feature_extractor.feature_size == engine.model.config.num_mel_bins == 80


def test_engine_equals_the_transformers_pipeline(engine):
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=engine.model, tokenizer=engine.tokenizer,
                   feature_extractor=engine.feature_extractor, device="cpu")
    for seed, seconds in [(1, 4.0), (2, 11.5)]:
        audio = voice(seconds, seed)
        out = engine.transcribe([engine.prepare(audio, settings(engine, language="en"))])[0]
        ref = asr(audio, return_timestamps=True,
                  generate_kwargs={"language": "en", "task": "transcribe", "num_beams": 1})
        assert "".join(s.text for s in out.segments).strip() == ref["text"].strip()


def test_batched_equals_unbatched_for_short_and_long_audio(engine):
    jobs = [engine.prepare(voice(s, i), settings(engine, language="en"))
            for i, s in enumerate([3.0, 7.5, 29.0, 41.0, 65.0])]
    alone = [engine.transcribe([job])[0] for job in jobs]
    together = engine.transcribe(jobs)
    key = lambda out: [(s.start, s.end, s.tokens) for s in out.segments]  # noqa: E731
    assert [key(o) for o in together] == [key(o) for o in alone]
    long = alone[-1]
    assert long.duration == 65.0 and max(s.end for s in long.segments) > 30.0
    assert all(s.end <= 65.0 for s in long.segments)


def test_language_is_detected_when_not_given(engine):
    out = engine.transcribe([engine.prepare(voice(3.0, 5), settings(engine))])[0]
    assert f"<|{out.language}|>" in engine.lang_to_id


def test_settings_validation(engine):
    assert settings(engine, language="English").language == "en"
    with pytest.raises(InvalidRequest) as info:
        settings(engine, language="klingon")
    assert info.value.param == "language"
    prompted = settings(engine, prompt="hello world " * 300)
    assert prompted.prompt_ids[0] == engine.tokenizer.convert_tokens_to_ids("<|startofprev|>")
    assert len(prompted.prompt_ids) <= 223 and prompted.max_new_tokens >= 1
    assert settings(engine, temperature=0.4).temperature == 0.4
