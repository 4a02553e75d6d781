"""The generation engine: continuous batching over one model, no Ray, no HTTP.

Implements :class:`deployments.engines.base.Engine`: ``submit(requests)`` admits a group of
:class:`GenerationRequest` (prefilled together at the next step boundary) and returns one
:class:`~deployments.engines.streams.RequestStream` per request. A stream is an async iterator of
``list[Delta]``: each item holds everything the request produced since the consumer last asked (so a
slow consumer gets several tokens in one item, and a fast one gets each step's token at once). A
choice's last delta carries ``finish_reason`` and its token counts; the stream ends when every choice
finished, or raises the :class:`ServingError` that failed this request alone.

Groups submitted while others decode are prefilled and concatenated into the running batch at the next
step (up to ``max_running_rows``), so a new request does not wait for a long one. All model work runs on
one dedicated model thread that steps on its own for as long as there is work: it never waits for the
event loop between steps (on a busy replica the loop may be late by milliseconds, which would idle the
model that long per step). Each step's output is offered to its request's stream, and the submitting
loop is woken only where a reader waits for it (``deployments.engines.streams``); the loop only hands out
deltas.

When the process holds other engines (on-demand models), the model thread ends after
:data:`IDLE_EXIT_S` without work, and the next ``submit`` starts another. Why: a thread that ran torch's
parallel ops keeps an OpenMP team while it lives, and in a process with more such teams than CPUs
every team stops spinning between ops, so one idle engine would slow down every other engine of the
process (see ``deployments.engines.base.on_passing_thread``). Measured with two engines in one
process: an 8-row step of the busy one took 16.9 ms beside the other's idle thread, 11.2 ms once that
thread had ended, 10.1-10.8 ms alone. An engine alone in its process keeps its thread: a new thread's
first prefill measured about 5 ms slower.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from app.config import BatchingSpec
from app.errors import InternalError, ServingError
from deployments.engines.base import release_memory
from deployments.engines.batch import Batch, supports_concatenation
from deployments.engines.plain_batch import PlainBatch
from deployments.engines.buckets import MAX_BUCKETS, Buckets
from deployments.engines.detokenize import TextStream
from deployments.engines.fast_decode import fast_decoder
from deployments.engines.grammar import Grammars, MaskJob, start_masks
from deployments.engines.observer import NULL_OBSERVER, Observer
from deployments.engines.prefill_groups import by_request, length_groups, packs
from deployments.engines.records import Delta, GenerationRequest, SamplingParams, TokenLogprob
from deployments.engines.sampling import Logprobs, make_generator, select_tokens
from deployments.engines.streams import RequestStream, deliver_threadsafe
from deployments.engines.vision import image_token_id, takes_images

logger = logging.getLogger(__name__)

# Seconds without work after which the model thread of an engine that shares its process ends (see the
# module docstring).
IDLE_EXIT_S = 2.0

_ENGINES: "weakref.WeakSet[GenerationEngine]" = weakref.WeakSet()  # this process's open engines


@dataclass(eq=False)
class _Sequence:
    """One choice being generated."""

    request: GenerationRequest
    index: int
    out: RequestStream
    text: TextStream
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    pending: list[Delta] = field(default_factory=list)  # written on the model thread, moved by _publish
    matcher: Any = None  # the request's grammar state for this choice (model thread), if constrained
    submitted: float = field(default_factory=time.perf_counter)  # for the observer's timings
    last_token: float = 0.0
    finished: bool = False
    error: ServingError | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def live(self) -> bool:
        return not (self.finished or self.error is not None or self.request.cancelled)


class GenerationEngine:
    """Owns one model and tokenizer; see the module docstring for the contract.

    ``context_len`` is the longest prompt + completion the model takes, in tokens.
    """

    def __init__(self, model: Any, tokenizer: Any, *, device: torch.device, eos_token_ids: set[int],
                 pad_token_id: int, context_len: int = 2048, max_running_rows: int = 64,
                 max_prefill_tokens: int = 4096, prefill_threads: int | None = None,
                 decode_threads: int | None = None, fast_decode: bool = True,
                 packed_weights: bool = True, product_kernel: bool = True, tool_parser: str = "hermes",
                 processor: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # A vision-language model's processor (images -> model inputs: deployments.engines.vision); such a
        # model's chat template reads message content as a list of parts.
        self.processor = processor
        self.content_parts = takes_images(processor)
        config = getattr(model, "config", None)
        self.image_token_id = image_token_id(config)
        self.device = device
        self.context_len = context_len
        self.eos_token_ids = set(eos_token_ids)
        self._eos = tuple(sorted(self.eos_token_ids))
        # Token ids a request may name (logit_bias, stop_token_ids): known to the tokenizer and the model.
        width = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
        self.vocab_size = min(len(tokenizer), width) if width else len(tokenizer)
        self.tool_parser = tool_parser  # the model's tool-call format (deployments.engines.tool_parsers)
        # Structured output and logprobs' token texts (deployments.engines.grammar).
        self.grammars = Grammars(tokenizer, width or len(tokenizer))
        self.pad_token_id = pad_token_id
        self.max_running_rows = max_running_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_threads = prefill_threads
        cpu = device.type == "cpu"
        self.decode_threads = (decode_threads if cpu else None) or torch.get_num_threads()
        self.can_concatenate = supports_concatenation(model)
        self._batch_class = Batch if self.can_concatenate else PlainBatch
        # The lean prefill and decode step for the families it computes (fast_decode.FAMILIES).
        self.fast_decoder = (fast_decoder(model, packed_weights, product_kernel)
                             if self.can_concatenate and fast_decode else None)
        # Shared with the model thread (under _lock): groups waiting for admission, the stop flag.
        self._lock = threading.Condition()
        self._waiting: deque[list[_Sequence]] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Model thread only: admitted sequences whose output may still need publishing, the batch.
        self._admitted: list[_Sequence] = []
        self._running: Buckets | PlainBatch | None = None
        # Counters for metrics and tests (e.g. that a cancelled request stopped consuming steps).
        self.steps = 0
        self.tokens_generated = 0
        self.masked_rows = 0  # constrained row-steps, and the model thread's seconds waiting for their masks
        self.mask_wait_s = 0.0
        # Per-request timings for metrics (deployments/engines/observer.py); the deployment sets its own.
        self.observer: Observer = NULL_OBSERVER
        self._now = 0.0  # when the current step's tokens were chosen (model thread)
        _ENGINES.add(self)

    @property
    def running_rows(self) -> int:
        return len(self._running) if self._running is not None else 0

    def apply(self, batching: BatchingSpec) -> None:
        """Adopt ``max_running_rows`` and ``max_prefill_tokens`` (a :class:`ChatBatchingSpec`'s)."""
        self.max_running_rows = getattr(batching, "max_running_rows", self.max_running_rows)
        self.max_prefill_tokens = getattr(batching, "max_prefill_tokens", self.max_prefill_tokens)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = [s for group in self._waiting for s in group if s.live]
        requests = {id(s.request): s.request for s in waiting}
        return {"steps": self.steps, "tokens_generated": self.tokens_generated,
                "masked_rows": self.masked_rows, "mask_wait_s": self.mask_wait_s,
                "running_rows": self.running_rows, "waiting_groups": len(self._waiting),
                # What the autoscaling policy reads (deployments/autoscaling.py): rows not yet prefilled
                # and their prompt tokens (a request's n choices share one prompt).
                "waiting_rows": len(waiting), "waiting_requests": len(requests),
                "waiting_prefill_tokens": sum(len(r.prompt_ids) for r in requests.values()),
                "max_running_rows": self.max_running_rows, "context_len": self.context_len}

    def close(self) -> None:
        """Stop the model thread (after its current step), fail what is in flight and drop the model."""
        _ENGINES.discard(self)
        with self._lock:
            self._closed = True
            waiting = [s for group in self._waiting for s in group]
            self._waiting.clear()
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        in_flight = [*(self._running.rows if self._running else []), *self._admitted, *waiting]
        deliver_threadsafe([(seq.out, [], InternalError("the model was unloaded")) for seq in in_flight])
        self._running, self._admitted = None, []
        # The lean step holds the packed copies of the weights (oneDNN's or the product kernel's): drop
        # it with the model, so that a closed engine someone still references holds no weights.
        self.model = self.fast_decoder = None
        release_memory(self.device.type)

    def submit(self, requests: list[GenerationRequest]) -> list[RequestStream]:
        """Admit ``requests`` as one prefill group (a model whose batch cannot concatenate: its requests
        with images each as a group of their own); must be called on the event loop that consumes the
        streams."""
        streams = [RequestStream(r) for r in requests]
        group = [_Sequence(r, i, out, TextStream(self.tokenizer, r.params.stop, r.prompt_ids),
                           None if r.params.greedy else make_generator(r.params.seed, i))
                 for r, out in zip(requests, streams) for i in range(r.n)]
        groups = [group]
        if not self.can_concatenate and any(r.images is not None for r in requests):
            text = [s for s in group if s.request.images is None]
            groups = [*([text] if text else []), *by_request([s for s in group if s.request.images is not None])]
        with self._lock:
            if self._closed:
                raise InternalError("the model was unloaded")
            self._waiting.extend(groups)
            if self._thread is None:
                self._thread = threading.Thread(target=self._model_loop, name="engine", daemon=True)
                self._thread.start()
            self._lock.notify()
        return streams

    # --- model thread ---------------------------------------------------------------------------

    def _model_loop(self) -> None:
        """Step while there is work: admit what fits, prefill it, decode one token for every running
        row; publish after each (first tokens go out before the next decode step)."""
        while True:
            with self._lock:
                while not self._closed and not self._waiting and self._running is None:
                    idle = not self._lock.wait(IDLE_EXIT_S)
                    if idle and not self._waiting and not self._closed and len(_ENGINES) > 1:
                        self._thread = None  # under the lock: submit() sees it and starts another
                        return
                if self._closed:
                    return
                admitted = self._admissible()
            self._admitted += admitted
            try:
                if admitted:
                    self._prefill(admitted)  # publishes each prefill group's first tokens
                if self._running is not None:
                    self._decode()
            except Exception:  # a bug or a device failure: fail what is in flight, keep serving
                logger.exception("engine step failed")
                for seq in [*(self._running.rows if self._running else []), *admitted]:
                    seq.error = seq.error or InternalError("generation failed")
                self._running = None
            self._publish()

    def _admissible(self) -> list[_Sequence]:
        """Sequences of waiting groups that fit next to the running batch, in arrival order, up to
        ``max_prefill_tokens`` prompt tokens (at least one group), so that a burst of arrivals delays
        the running streams' next token by a bounded prefill."""
        admitted: list[_Sequence] = []
        if self._running is not None and not self.can_concatenate:
            return admitted
        rows, budget = self.running_rows, self.max_prefill_tokens
        while self._waiting:
            live = [s for s in self._waiting[0] if s.live]
            tokens = sum(len(r.prompt_ids) for r in {id(s.request): s.request for s in live}.values())
            if admitted and tokens > budget or rows > 0 and rows + len(live) > self.max_running_rows:
                break
            # A batch that cannot concatenate is one prefill: a request with images is its own (submit).
            if admitted and not self.can_concatenate and any(s.request.images is not None
                                                             for s in [*admitted, *live]):
                break
            self._waiting.popleft()
            rows, budget = rows + len(live), budget - tokens
            admitted += live
        now = time.perf_counter()
        for seq in admitted:
            if seq.index == 0:
                self.observer.queued(now - seq.submitted)
        return admitted

    def _publish(self) -> None:
        """Hand each admitted sequence's new deltas (or error) to its request's stream, on the stream's
        event loop (one callback per loop and step)."""
        still, out = [], []
        for seq in self._admitted:
            deltas, seq.pending = seq.pending, []
            if deltas or seq.error is not None:
                out.append((seq.out, deltas, seq.error))
            if seq.live:
                still.append(seq)
        self._admitted = still
        deliver_threadsafe(out)

    def _prefill(self, seqs: list[_Sequence]) -> None:
        threads = self.prefill_threads if self.device.type == "cpu" else None
        if threads:
            torch.set_num_threads(threads)  # this thread is the process's only torch user
        try:
            with torch.inference_mode():
                live = [s for s in seqs if s.live]
                for seq in live:  # here, not in submit: a matcher takes ~2 ms to set up, off the event loop
                    if seq.request.grammar is not None and seq.matcher is None:
                        seq.matcher = self.grammars.matcher(seq.request.grammar)
                # The lean prefill packs prompts without padding; the forward needs similar lengths, but
                # a batch that cannot concatenate (sliding-window layers) is prefilled as one, padded.
                # A request with images is prefilled alone, through the model's forward.
                text = [s for s in live if s.request.images is None]
                groups = (packs(text) if self.fast_decoder else length_groups(text) if self.can_concatenate
                          else [text] if text else [])
                for group in [*groups, *by_request([s for s in live if s.request.images is not None])]:
                    started = time.perf_counter()
                    masks = start_masks(group, self.grammars)  # computed while the prompts run
                    images = group[0].request.images
                    batch, logits = self._batch_class.prefill(
                        self.model, group, [s.request.prompt_ids for s in group], self.pad_token_id,
                        self.device, None if images is not None else self.fast_decoder, images)
                    self._advance(batch, logits, masks)
                    for seq in group:
                        if seq.index == 0:
                            self.observer.prefilled(self._now - started, len(seq.request.prompt_ids))
                    # This group's first tokens go out now, not after the admission's other groups: an
                    # admission of max_prefill_tokens can take seconds to prefill on a CPU.
                    self._publish()
                    if (batch := self._keep_live(batch)) is None:
                        continue
                    if self._running is not None:
                        self._running = self._running.concatenate(batch)
                    else:  # only batches that concatenate run as buckets (see _admissible)
                        self._running = (Buckets(batch, MAX_BUCKETS if self.fast_decoder else 1)
                                         if self.can_concatenate else batch)
        finally:
            if threads:
                torch.set_num_threads(self.decode_threads)

    def _decode(self) -> None:
        if self.device.type == "cpu" and torch.get_num_threads() != self.decode_threads:
            torch.set_num_threads(self.decode_threads)  # this thread is the process's only torch user
        with torch.inference_mode():  # filtering updates the batch's buffers in place
            batch = self._keep_live(self._running)
            if batch is None:
                self._running = None
                return
            masks = start_masks(batch.rows, self.grammars)  # computed while the step runs
            logits = batch.decode(self.model, self.fast_decoder)
            self._advance(batch, logits, masks)
            self._running = self._keep_live(batch)

    def _advance(self, batch: Batch, logits: torch.Tensor, masks: MaskJob | None = None) -> None:
        """Choose each row's next token (within its grammar, if any) and turn it into output."""
        self.steps += 1
        if masks is not None:
            self.masked_rows += len(masks.rows)
            started = time.perf_counter()
            masks.wait()
            self.mask_wait_s += time.perf_counter() - started
        tokens, failed, logprobs = select_tokens(logits, batch.rows, self._eos, masks)
        self._now = time.perf_counter()
        batch.set_next(tokens)
        self.tokens_generated += len(tokens)
        for i, (seq, token) in enumerate(zip(batch.rows, tokens)):
            if i in failed:
                logger.error("request %s: sampling failed: %r", seq.request.request_id, failed[i])
                seq.error = InternalError("sampling failed for this request's settings")
                continue
            try:
                if seq.matcher is not None and not seq.matcher.consume_token(token):
                    raise RuntimeError(f"grammar refused token {token}: {seq.matcher.get_error()}")
                self._append(seq, token, logprobs.get(i))
            except Exception:  # isolate: this sequence fails, its neighbours carry on
                logger.exception("request %s failed while decoding", seq.request.request_id)
                seq.error = InternalError("generation failed for this request")

    def _append(self, seq: _Sequence, token: int, logprobs: Logprobs | None = None) -> None:
        seq.output_ids.append(token)
        self._observe_token(seq)
        finish, params = None, seq.params
        report = None if logprobs is None else [self._token_logprob(token, logprobs)]
        # An ending token (EOS unless ignore_eos, or one of stop_token_ids) adds no text of its own; a
        # grammar's end is the end even with ignore_eos (its matcher takes nothing after it).
        ends = token in self.eos_token_ids and (not params.ignore_eos or seq.matcher is not None)
        if token in params.stop_token_ids or ends:
            text, finish, report = seq.text.finish(), "stop", None  # not content: no logprob either
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                finish = "stop"
            elif len(seq.output_ids) >= params.max_new_tokens:
                text, finish = text + seq.text.finish(), "length"
        if finish is None:
            if text or report:
                seq.pending.append(Delta(seq.index, text, [token], logprobs=report))
            return
        seq.finished = True
        seq.pending.append(Delta(seq.index, text, [token], finish, len(seq.request.prompt_ids),
                                 len(seq.output_ids), logprobs=report))
        self.observer.finished(finish, len(seq.request.prompt_ids), len(seq.output_ids))

    def _observe_token(self, seq: _Sequence) -> None:
        """Report a choice's new token to the observer: the request's first token (its first choice's), or
        the gap since this choice's previous one."""
        if len(seq.output_ids) > 1:
            self.observer.inter_token(self._now - seq.last_token)
        elif seq.index == 0:
            self.observer.first_token(self._now - seq.submitted)
        seq.last_token = self._now

    def _token_logprob(self, token: int, logprobs: Logprobs) -> TokenLogprob:
        chosen, top = logprobs
        text, raw = self.grammars.token(token)
        return TokenLogprob(text, raw, chosen, tuple((*self.grammars.token(t), lp) for t, lp in top))

    @staticmethod
    def _keep_live(batch: Batch) -> Batch | None:
        return batch.filter([i for i, s in enumerate(batch.rows) if s.live])
