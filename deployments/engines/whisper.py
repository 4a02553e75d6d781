"""The Whisper engine: any transformers Whisper checkpoint, batched long-form transcription.

Contracts:

- :func:`to_decode_settings` turns a wire :class:`TranscriptionRequest` into :class:`DecodeSettings`
  (language code, task, prompt ids, temperature, token cap), raising InvalidRequest for what the
  checkpoint cannot do (unknown language, translation on an English-only model).
- :meth:`WhisperEngine.prepare` (CPU, synchronous) computes one request's log-mel features: 30 s padded
  for short audio, the whole file (``truncation=False``) for long audio, plus the attention mask giving
  its true length in frames.
- :meth:`WhisperEngine.submit` (the :class:`~deployments.engines.base.Engine` contract, from
  :class:`~deployments.engines.jobs.JobEngine`) queues jobs; the
  engine's one model thread transcribes everything waiting together, each job's stream yielding its one
  :class:`WhisperOutput`.
- :meth:`WhisperEngine.transcribe` (synchronous, on the model thread) transcribes a batch of jobs with
  ``model.generate(..., return_timestamps=True, return_segments=True)``: rows are padded to the longest
  job and transformers slides a 30 s window over each row separately, so a row's result does not depend
  on the other rows (batched == unbatched). Jobs that need different decoder prompts or tasks run in
  separate ``generate`` calls. A job's segments come out through :func:`timed_segments`: each one lasts
  some time, in order, within the audio (what srt/vtt cues need).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.config import AudioSpec
from app.config import BatchingSpec
from app.errors import InvalidRequest
from app.protocol.audio import TranscriptionRequest
from deployments.engines.audio import SAMPLE_RATE
from deployments.engines.jobs import JobEngine
from deployments.engines.records import Segment, WhisperOutput

logger = logging.getLogger(__name__)

TIME_PRECISION = 0.02  # seconds per timestamp token
DECODER_CONTEXT = 448  # Whisper's max_target_positions: prompt + prefix + generated tokens


@dataclass(frozen=True)
class DecodeSettings:
    """What one request asks of the decoder (hashable: jobs with equal keys share a generate call)."""

    language: str | None  # ISO code; None = detect from the first 30 s
    task: str
    prompt_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    max_new_tokens: int = 224

    def group_key(self) -> tuple:
        return (self.task, self.prompt_ids, self.temperature, self.max_new_tokens)


@dataclass
class AudioJob:
    """One request's features, ready to batch."""

    features: torch.Tensor  # (n_mels, frames), frames >= 3000
    num_frames: int  # frames of real audio (the rest is padding)
    duration: float  # seconds
    settings: DecodeSettings
    cancelled: bool = False


class WhisperEngine(JobEngine):
    """A loaded Whisper checkpoint. Not thread-safe: one ``transcribe`` call at a time."""

    failure = "transcription failed"

    def __init__(self, model, processor, *, device: torch.device, dtype: torch.dtype,
                 max_new_tokens: int | None = None, max_windows_per_batch: int = 32) -> None:
        super().__init__("whisper")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.device, self.dtype = device, dtype
        gen = model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False)) and hasattr(gen, "lang_to_id")
        self.lang_to_id: dict[str, int] = dict(getattr(gen, "lang_to_id", {}) or {})
        self.id_to_lang = {i: tok.strip("<|>") for tok, i in self.lang_to_id.items()}
        self.timestamp_begin = gen.no_timestamps_token_id + 1
        self.eos_token_id = gen.eos_token_id
        self.max_new_tokens = max_new_tokens or getattr(gen, "max_new_tokens", None) or DECODER_CONTEXT // 2
        self.max_windows_per_batch = max_windows_per_batch
        self.windows_decoded = 0
        self.batches = 0  # transcribe() calls

    # -- the Engine contract (event loop) -----------------------------------------------------------

    def apply(self, batching: BatchingSpec) -> None:
        """Nothing to adopt: the engine takes whatever waits (up to max_windows_per_batch per call)."""

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "windows": self.windows_decoded, "waiting": len(self._waiting)}

    def _compute(self, jobs: list[AudioJob]) -> list[list[WhisperOutput]]:
        return [[output] for output in self.transcribe(jobs)]

    # -- per request (worker thread) ----------------------------------------------------------------

    def prepare(self, samples: np.ndarray, settings: DecodeSettings) -> AudioJob:
        """Log-mel features of ``samples`` (16 kHz mono float32) for :meth:`transcribe`."""
        fe = self.feature_extractor
        long_form = len(samples) > fe.n_samples
        # As transformers' ASR pipeline does: pad short audio to 30 s; keep long audio whole.
        out = fe(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True,
                 **({"truncation": False, "padding": "longest"} if long_form else {}))
        frames = out.input_features[0]
        if frames.shape[-1] < fe.nb_max_frames:
            frames = torch.nn.functional.pad(frames, (0, fe.nb_max_frames - frames.shape[-1]))
        return AudioJob(features=frames, num_frames=int(out.attention_mask[0].sum()),
                        duration=len(samples) / SAMPLE_RATE, settings=settings)

    # -- per batch (worker thread) ------------------------------------------------------------------

    @torch.inference_mode()
    def transcribe(self, jobs: list[AudioJob]) -> list[WhisperOutput]:
        """Transcribe ``jobs`` together; the result for each job does not depend on the others."""
        self.batches += 1
        languages = self._languages(jobs)
        groups: dict[tuple, list[int]] = {}
        window = self.feature_extractor.nb_max_frames
        for i, job in enumerate(jobs):
            # generate() takes its long-form path for the whole batch if any row is longer than 30 s,
            # and that path decodes short rows differently: keep short and long rows apart.
            long_form = job.features.shape[-1] > window
            groups.setdefault((long_form, *job.settings.group_key()), []).append(i)
        results: list[WhisperOutput | None] = [None] * len(jobs)
        for rows in groups.values():
            for start in range(0, len(rows), self.max_windows_per_batch):
                chunk = rows[start:start + self.max_windows_per_batch]
                outs = self._generate([jobs[i] for i in chunk], [languages[i] for i in chunk])
                for i, out in zip(chunk, outs):
                    results[i] = out
        return results  # type: ignore[return-value]

    def _languages(self, jobs: list[AudioJob]) -> list[str]:
        """The requested language, else the one detected on the first 30 s (English-only models: en)."""
        if not self.multilingual:
            return ["en"] * len(jobs)
        todo = [i for i, job in enumerate(jobs) if job.settings.language is None]
        found = {i: job.settings.language for i, job in enumerate(jobs)}
        if todo:
            window = self.feature_extractor.nb_max_frames
            feats = torch.stack([jobs[i].features[:, :window] for i in todo]).to(self.device, self.dtype)
            ids = self.model.detect_language(input_features=feats)
            for i, lang_id in zip(todo, ids.tolist()):
                found[i] = self.id_to_lang.get(lang_id, "en")
        return [found[i] for i in range(len(jobs))]

    def _generate(self, jobs: list[AudioJob], languages: list[str]) -> list[WhisperOutput]:
        settings = jobs[0].settings
        width = max(job.features.shape[-1] for job in jobs)
        feats = torch.zeros(len(jobs), jobs[0].features.shape[0], width)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, job in enumerate(jobs):
            feats[row, :, :job.features.shape[-1]] = job.features
            mask[row, :job.num_frames] = 1
        kwargs = dict(input_features=feats.to(self.device, self.dtype), attention_mask=mask.to(self.device),
                      return_timestamps=True, return_segments=True, return_dict_in_generate=True,
                      output_scores=True, max_new_tokens=settings.max_new_tokens)
        if self.multilingual:
            kwargs.update(language=languages if len(set(languages)) > 1 else languages[0],
                          task=settings.task)
        if settings.prompt_ids:
            kwargs["prompt_ids"] = torch.tensor(settings.prompt_ids, device=self.device)
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature)
        out = self.model.generate(**kwargs)
        results = []
        for row, job in enumerate(jobs):
            segments = timed_segments([s for s in map(self._segment, out["segments"][row]) if s.text.strip()],
                                      job.duration)
            windows = max(1, math.ceil(job.num_frames / self.feature_extractor.nb_max_frames))
            self.windows_decoded += windows
            results.append(WhisperOutput(
                language=languages[row], language_name=language_name(languages[row]),
                duration=job.duration, temperature=settings.temperature,
                segments=segments, prompt_tokens=len(settings.prompt_ids),
                audio_tokens=windows * self.model.config.max_source_positions))
        return results

    def _segment(self, seg: dict) -> Segment:
        """One of generate()'s segments, with the times the decoder gave it (see :func:`timed_segments`)."""
        tokens = [t for t in seg["tokens"].tolist() if t != self.eos_token_id]
        text_tokens = [t for t in tokens if t < self.timestamp_begin]
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
        return Segment(start=float(seg["start"]), end=float(seg["end"]), text=text, tokens=tokens,
                       avg_logprob=_avg_logprob(seg), compression_ratio=_compression_ratio(text))


def timed_segments(segments: list[Segment], duration: float) -> list[Segment]:
    """``segments`` (in order) as cues a subtitle file can hold: each ends after it starts, none starts
    before the previous one ends, and all lie within ``[0, duration]``; times in whole milliseconds,
    word timings spread over each segment (:func:`words_of`).

    Whisper's timestamps are tokens the decoder chooses: it may place a segment past the end of the audio
    (the demo checkpoint's random weights do on nearly every window; real checkpoints at a clip's end) or
    give it no time. Clamped to the audio, such a segment would last nothing (``00:00:05,959 -->
    00:00:05,959``), so its text joins the segment before it (before the first timed segment: the one
    after it) and every response format keeps the whole text. Only when no segment has any time left
    does one segment carry all the text, up to the end of the audio; none when the audio is empty.
    """
    limit = round(max(duration, 0.0), 3)
    timed: list[Segment] = []
    held: list[Segment] = []  # timeless segments before the first timed one
    for seg in segments:
        floor = timed[-1].end if timed else 0.0
        start = round(min(max(seg.start, floor), limit), 3)
        end = round(min(max(seg.end, start), limit), 3)
        if end > start:
            timed.append(_joined([*held, seg], min([start, *(h.start for h in held)]), end))
            held = []
        elif timed:
            timed[-1] = _joined([timed[-1], seg], timed[-1].start, timed[-1].end)
        else:
            held.append(Segment(start, end, seg.text, seg.tokens, seg.avg_logprob, seg.compression_ratio))
    if held and limit > 0:
        start = min(h.start for h in held)
        timed.append(_joined(held, start if start < limit else 0.0, limit))
    return timed


def _joined(parts: list[Segment], start: float, end: float) -> Segment:
    """One segment spanning ``[start, end]`` with the text and tokens of ``parts``, in order."""
    text = "".join(p.text for p in parts)
    tokens = [t for p in parts for t in p.tokens]
    weights = [max(len(p.tokens), 1) for p in parts]
    logprob = sum(p.avg_logprob * w for p, w in zip(parts, weights)) / sum(weights)
    ratio = parts[0].compression_ratio if len(parts) == 1 else _compression_ratio(text)
    return Segment(start=start, end=end, text=text, tokens=tokens, avg_logprob=logprob,
                   compression_ratio=ratio, words=words_of(text, start, end))


def _avg_logprob(seg: dict) -> float:
    """Mean log-probability of the segment's tokens under the (processed) generation scores."""
    result = seg.get("result")
    if not isinstance(result, dict) or not result.get("scores"):
        return 0.0
    sequence, scores = result["sequences"], result["scores"]
    offset = len(sequence) - len(scores)  # the decoder prompt precedes the scored steps
    values = []
    for pos in range(*seg["idxs"]):
        step = pos - offset
        if 0 <= step < len(scores) and pos < len(sequence):
            logprob = torch.log_softmax(scores[step].float(), dim=-1)[int(sequence[pos])].item()
            if math.isfinite(logprob):
                values.append(logprob)
    return float(sum(values) / len(values)) if values else 0.0


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return float(len(data) / len(zlib.compress(data))) if data else 0.0


def words_of(text: str, start: float, end: float) -> list[tuple[str, float, float]]:
    """Word timestamps by spreading a segment's time over its words in proportion to their length.

    An approximation (no cross-attention alignment): exact at segment boundaries, monotonic inside.
    """
    words = text.split()
    total = sum(len(w) for w in words)
    if not words or total == 0:
        return []
    span, t, out = end - start, start, []
    for w in words:
        end = t + span * len(w) / total
        out.append((w, round(t, 3), round(end, 3)))
        t = end
    return out


# -- wire request -> decoder settings ----------------------------------------------------------------

def to_decode_settings(request: TranscriptionRequest, engine: WhisperEngine, limits: AudioSpec) -> DecodeSettings:
    """Validate ``request`` against what the checkpoint supports and fix the decoder settings."""
    language = _language_code(request.language, engine) if request.language else None
    if request.task == "translate":
        if not engine.multilingual:
            raise InvalidRequest("This model is English-only and cannot translate.", param="model",
                                 code="unsupported_task")
    elif not engine.multilingual and language not in (None, "en"):
        raise InvalidRequest("This model is English-only; language must be 'en'.", param="language")
    prompt_ids: tuple[int, ...] = ()
    if request.prompt:
        ids = engine.tokenizer.get_prompt_ids(request.prompt, return_tensors="np").tolist()
        # Whisper keeps at most half its context for the prompt (the latest tokens matter most).
        keep = DECODER_CONTEXT // 2 - 1
        prompt_ids = tuple(ids[:1] + ids[1:][-(keep - 1):])
    cap = limits.max_new_tokens_per_window or engine.max_new_tokens
    cap = max(1, min(cap, DECODER_CONTEXT - len(prompt_ids) - 4))
    return DecodeSettings(language=language, task=request.task, prompt_ids=prompt_ids,
                          temperature=request.temperature, max_new_tokens=cap)


def _language_code(language: str, engine: WhisperEngine) -> str:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    name = language.strip().lower()
    code = TO_LANGUAGE_CODE.get(name, name)
    if engine.multilingual and f"<|{code}|>" not in engine.lang_to_id:
        raise InvalidRequest(f"Unsupported language {language!r}: use an ISO-639-1 code such as 'en' "
                             "or an English language name.", param="language", code="unsupported_language")
    return code


def language_name(code: str) -> str:
    """The English name of a language code ('en' -> 'english'), as OpenAI's verbose_json reports it."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code)
