"""Transcriptions and translations on the ingress side.

The Whisper deployment streams :class:`deployments.whisper_engine.WhisperOutput` items;
:func:`transcript_chunks` turns them into :class:`TranscriptChunk` items, each carrying one wire event
(``transcript.text.delta`` per segment, then one ``transcript.text.done``) plus the segment details the
non-streamed formats need. Streamed, the chunks go out as SSE (only the event, via :func:`dump_event`);
not streamed, :func:`collect_transcript` folds the same chunks into a :class:`Transcript`, which
``FORMATTERS[response_format]`` renders as json, text, srt, verbose_json or vtt.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError

from app.errors import RequestTooLarge, validation_error
from app.protocol.audio import (DurationUsage, InputTokenDetails, TokenUsage, TranscriptionRequest,
                                TranscriptionResponse, TranscriptionSegment, TranscriptionVerboseResponse,
                                TranscriptionWord, TranscriptTextDelta, TranscriptTextDone)
from app.streaming import respond


class TranscriptChunk(BaseModel):
    """One wire event and, beside it, what the collected formats need (never sent when streaming)."""

    event: TranscriptTextDelta | TranscriptTextDone
    segments: list[TranscriptionSegment] = []
    words: list[TranscriptionWord] = []
    language: str | None = None
    duration: float | None = None


class Transcript(BaseModel):
    """The collected stream: everything any response format is rendered from."""

    request: TranscriptionRequest
    text: str
    language: str
    duration: float
    segments: list[TranscriptionSegment]
    words: list[TranscriptionWord]


def transcription_request(task: str, fields: dict[str, Any]) -> TranscriptionRequest:
    """Validate the form fields (strings, as sent) into a request; InvalidRequest names a bad field."""
    try:
        return TranscriptionRequest.model_validate(
            {"task": task, **{k: v for k, v in fields.items() if v is not None}})
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def read_upload(file: Any, max_bytes: int) -> bytes:
    """The uploaded file's bytes; RequestTooLarge (413) past ``max_bytes``."""
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RequestTooLarge(f"The audio file is larger than this model's limit of {max_bytes} bytes.",
                              param="file")
    return data


async def transcript_chunks(outputs: AsyncIterator[Any]) -> AsyncIterator[TranscriptChunk]:
    """Deployment outputs -> chunks: one delta per non-empty segment, then the done event with usage.

    The deltas concatenate to the done event's text (the first one without its leading space).
    """
    from deployments.whisper_engine import language_name, words_of  # deployment-side types

    text, seg_id = "", 0
    prompt_tokens = audio_tokens = output_tokens = 0
    language, duration = "english", 0.0
    async for out in outputs:
        language, duration = language_name(out.language), out.duration
        prompt_tokens += out.prompt_tokens
        audio_tokens += out.audio_tokens
        output_tokens += out.output_tokens
        for seg in out.segments:
            piece = seg.text if text else seg.text.lstrip()
            text += piece
            wire = TranscriptionSegment(
                id=seg_id, seek=int(round(seg.start * 100)), start=seg.start, end=seg.end, text=seg.text,
                tokens=seg.tokens, temperature=out.temperature, avg_logprob=seg.avg_logprob,
                compression_ratio=seg.compression_ratio, no_speech_prob=0.0)
            seg_id += 1
            words = [TranscriptionWord(word=w, start=s, end=e) for w, s, e in words_of(seg)]
            yield TranscriptChunk(event=TranscriptTextDelta(delta=piece), segments=[wire], words=words,
                                  language=language, duration=duration)
    text_tokens = prompt_tokens
    usage = TokenUsage(input_tokens=text_tokens + audio_tokens, output_tokens=output_tokens,
                       total_tokens=text_tokens + audio_tokens + output_tokens,
                       input_token_details=InputTokenDetails(text_tokens=text_tokens, audio_tokens=audio_tokens))
    yield TranscriptChunk(event=TranscriptTextDone(text=text, usage=usage), language=language,
                          duration=duration)


def collect_transcript(request: TranscriptionRequest):
    """The collector for ``request``: folds :func:`transcript_chunks` into a :class:`Transcript`."""

    async def collect(chunks: AsyncIterator[TranscriptChunk]) -> Transcript:
        segments: list[TranscriptionSegment] = []
        words: list[TranscriptionWord] = []
        text, language, duration = "", "english", 0.0
        async for c in chunks:
            segments += c.segments
            words += c.words
            language, duration = c.language or language, c.duration if c.duration is not None else duration
            if isinstance(c.event, TranscriptTextDone):
                text = c.event.text
        return Transcript(request=request, text=text, language=language, duration=duration,
                          segments=segments, words=words)

    return collect


def dump_event(chunk: TranscriptChunk) -> dict[str, Any]:
    """SSE rendering: the wire event alone."""
    return chunk.event.model_dump(exclude_none=True)


# -- response formats --------------------------------------------------------------------------------

def _json(t: Transcript) -> Response:
    return JSONResponse(TranscriptionResponse(
        text=t.text, usage=DurationUsage(seconds=round(t.duration, 3))).model_dump(exclude_none=True))


def _verbose_json(t: Transcript) -> Response:
    translate = t.request.task == "translate"
    body = TranscriptionVerboseResponse(
        task=t.request.task, language="english" if translate else t.language,
        duration=round(t.duration, 3), text=t.text,
        segments=t.segments if "segment" in t.request.timestamp_granularities else None,
        words=t.words if t.request.wants_words and not translate else None,
        usage=None if translate else DurationUsage(seconds=round(t.duration, 3)))
    return JSONResponse(body.model_dump(exclude_none=True))


def _text(t: Transcript) -> Response:
    return PlainTextResponse(t.text + "\n")


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(t: Transcript) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, blank line between cues."""
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(t.segments, start=1))


def vtt(t: Transcript) -> str:
    """WebVTT: the ``WEBVTT`` header, then ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cues."""
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in t.segments)


FORMATTERS: dict[str, Callable[[Transcript], Response]] = {
    "json": _json,
    "verbose_json": _verbose_json,
    "text": _text,
    "srt": lambda t: PlainTextResponse(srt(t), media_type="application/x-subrip"),
    "vtt": lambda t: PlainTextResponse(vtt(t), media_type="text/vtt"),
}


async def respond_transcript(chunks: AsyncIterator[TranscriptChunk], request: TranscriptionRequest, *,
                             timeout_s: float | None = None) -> Response:
    """Stream the events (``stream=true``), else answer in ``request.response_format``.

    Past ``timeout_s`` the answer is a 504 (or a timeout error frame once streaming began).
    """
    return await respond(chunks, stream=request.stream, collect=collect_transcript(request),
                         dump=dump_event, render=FORMATTERS[request.response_format], timeout_s=timeout_s)
