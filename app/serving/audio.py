"""Transcriptions and translations on the ingress side; :data:`TRANSCRIPTION` and :data:`TRANSLATION`
are the route table's serving objects.

The request is a multipart form (the audio in ``file``). The Whisper deployment streams lists of
:class:`deployments.engines.records.WhisperOutput` (plain data: language names and word timings are
computed in the replica, so this process never loads the model's libraries); :func:`transcript_chunks`
turns them into :class:`TranscriptChunk` items, each carrying one wire event
(``transcript.text.delta`` per segment, then one ``transcript.text.done``) plus the segment details the
non-streamed formats need. Streamed, the chunks go out as SSE (only the event, via :func:`dump_event`);
not streamed, :func:`collect_transcript` folds the same chunks into a :class:`Transcript`, which
``FORMATTERS[response_format]`` renders as json, text, srt, verbose_json or vtt.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from app.errors import BodyTimedOut, InvalidRequest, RequestTooLarge, validation_error
from app.protocol.audio import (DurationUsage, InputTokenDetails, TokenUsage, TranscriptionRequest,
                                TranscriptionResponse, TranscriptionSegment, TranscriptionVerboseResponse,
                                TranscriptionWord, TranscriptTextDelta, TranscriptTextDone)
from app.serving.base import Inbound, Serving, model_name, within_body_timeout


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


async def transcript_chunks(records: AsyncIterator[list[Any]]) -> AsyncIterator[TranscriptChunk]:
    """Deployment outputs -> chunks: one delta per non-empty segment, then the done event with usage.

    The deltas concatenate to the done event's text (the first one without its leading space).
    """
    text, seg_id = "", 0
    prompt_tokens = audio_tokens = output_tokens = 0
    language, duration = "english", 0.0
    async for out in (out async for batch in records for out in batch):
        language, duration = out.language_name, out.duration
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
            words = [TranscriptionWord(word=w, start=s, end=e) for w, s, e in seg.words]
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


# Multipart fields that may repeat; OpenAI's SDK sends timestamp_granularities[] (one per value).
_LIST_FIELDS = {"timestamp_granularities[]": "timestamp_granularities",
                "timestamp_granularities": "timestamp_granularities"}


class TranscriptionServing(Serving):
    """``POST /v1/audio/transcriptions`` (``task = "transcribe"``) or ``/v1/audio/translations``
    (``"translate"``, to English): a transcription model's ``transcribe`` method."""

    task = "transcription"
    method = "transcribe"
    request_model = TranscriptionRequest

    def __init__(self, audio_task: str) -> None:
        self.audio_task = audio_task

    async def read(self, request: Request) -> Inbound:
        """The multipart form's fields; the upload stays unread until the model's limit is known."""
        try:
            form = await within_body_timeout(request, request.form())
        except (ClientDisconnect, BodyTimedOut):  # not a bad form: app/errors.py answers them (499, 408)
            raise
        except Exception as exc:  # multipart parser errors, wrong content type
            raise InvalidRequest(f"The request must be a multipart form with the audio in 'file' ({exc}).",
                                 param="file") from None
        fields: dict[str, Any] = {}
        files: dict[str, Any] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                files.setdefault(key, value)
            elif key in _LIST_FIELDS:
                fields.setdefault(_LIST_FIELDS[key], []).append(value)
            else:
                fields.setdefault(key, value)
        return Inbound(model=model_name(fields.get("model")), payload=fields, files=files)

    async def validate(self, inbound: Inbound, spec: Any) -> TranscriptionRequest:
        if "file" not in inbound.files:
            raise InvalidRequest("Missing the audio file: send it as the multipart field 'file'.",
                                 param="file")
        fields = {k: v for k, v in inbound.payload.items() if k != "file"}
        return transcription_request(self.audio_task, fields)

    async def args(self, body: TranscriptionRequest, inbound: Inbound, spec: Any) -> tuple:
        """The request and the upload's bytes (413 past the model's ``audio.max_upload_bytes``)."""
        return body, await read_upload(inbound.files["file"], spec.audio.max_upload_bytes)

    def chunks(self, records, body):
        return transcript_chunks(records)

    async def collect(self, chunks, body):
        return await collect_transcript(body)(chunks)

    def dump(self, chunk: TranscriptChunk, body) -> dict[str, Any]:
        return dump_event(chunk)

    def render(self, collected: Transcript, body: TranscriptionRequest) -> Response:
        return FORMATTERS[body.response_format](collected)

    def openapi(self) -> dict[str, Any]:
        schema = {"$ref": f"#/components/schemas/{self.request_model.__name__}"}
        upload = {"type": "object", "required": ["file"],
                  "properties": {"file": {"type": "string", "format": "binary"}}}
        return {"required": True, "content": {"multipart/form-data": {"schema": {"allOf": [schema, upload]}}}}


TRANSCRIPTION = TranscriptionServing("transcribe")
TRANSLATION = TranscriptionServing("translate")
