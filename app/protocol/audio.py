"""``/v1/audio/transcriptions`` and ``/v1/audio/translations`` wire models (pydantic only).

The request arrives as a multipart form; the ingress reads the form fields into
:class:`TranscriptionRequest` (the uploaded bytes travel beside it). Responses follow the OpenAI spec's
``CreateTranscriptionResponseJson``, ``CreateTranscriptionResponseVerboseJson``,
``TranscriptTextDeltaEvent`` and ``TranscriptTextDoneEvent``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from app.protocol.common import WireModel

AudioResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
AudioTask = Literal["transcribe", "translate"]
Granularity = Literal["word", "segment"]


class TranscriptionRequest(WireModel):
    """The form fields of a transcription or translation request (everything but ``file``)."""

    model: str = Field(min_length=1)
    task: AudioTask = Field("transcribe", description="Set by the route, not by the client.")
    language: str | None = Field(None, max_length=32, description=(
        "ISO-639-1 code or English name of the spoken language; detected when absent."))
    prompt: str | None = Field(None, max_length=4096, description="Text the decoder is conditioned on.")
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    response_format: AudioResponseFormat = "json"
    timestamp_granularities: list[Granularity] = Field(default_factory=lambda: ["segment"])
    stream: bool = False

    @field_validator("language", "prompt")
    @classmethod
    def _blank_is_absent(cls, value: str | None) -> str | None:
        # HTML forms and some SDKs send empty fields for unset ones.
        return value if value is None or value.strip() else None

    @field_validator("timestamp_granularities")
    @classmethod
    def _default_segment(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value)) or ["segment"]

    @property
    def wants_words(self) -> bool:
        return self.response_format == "verbose_json" and "word" in self.timestamp_granularities

    @property
    def wants_segments(self) -> bool:
        """Segments appear in verbose_json when asked for (the default) and always shape srt / vtt."""
        return self.response_format in ("srt", "vtt") or (
            self.response_format == "verbose_json" and "segment" in self.timestamp_granularities)


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class InputTokenDetails(BaseModel):
    text_tokens: int
    audio_tokens: int


class TokenUsage(BaseModel):
    type: Literal["tokens"] = "tokens"
    input_tokens: int
    input_token_details: InputTokenDetails
    output_tokens: int
    total_tokens: int


class TranscriptionResponse(BaseModel):
    """``response_format=json``."""

    text: str
    usage: DurationUsage | None = None


class TranscriptionVerboseResponse(BaseModel):
    """``response_format=verbose_json``; ``segments`` / ``words`` only when asked for."""

    task: AudioTask
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: DurationUsage | None = None


class TranscriptTextDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTextDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TokenUsage | None = None
