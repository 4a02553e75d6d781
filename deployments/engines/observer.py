"""What an engine reports about each request as it serves it: timings and token counts, for metrics.

Contract. An engine holds one :class:`Observer` in its ``observer`` attribute (a :class:`NullObserver`
until the deployment sets its own: ``deployments/metrics.py`` records them as Prometheus metrics). The
engine calls it on its model thread, so every method must be cheap (a few microseconds), thread-safe
and must never raise. Seconds are ``time.perf_counter`` differences. Per request (a request's ``n``
choices share its prompt and prefill): ``queued`` (submitted -> admitted to a prefill), ``prefilled``
(the forward pass of the prefill group it was in, and its prompt tokens), ``first_token`` (submitted ->
its first token chosen: the engine's share of the time to first token). Per choice: ``inter_token`` (gap
between two consecutive tokens) and ``finished`` (reason ``stop`` or ``length``, and token counts). A
cancelled or failed choice reports no ``finished``.

Imports nothing: the engines and their tests run without Ray.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    """Receives an engine's per-request figures (see the module contract)."""

    def queued(self, seconds: float) -> None: ...

    def prefilled(self, seconds: float, prompt_tokens: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, reason: str, prompt_tokens: int, generation_tokens: int) -> None: ...


class NullObserver:
    """Records nothing (an engine outside a deployment: tests, the bench's engine-alone runs)."""

    def queued(self, seconds: float) -> None:
        pass

    def prefilled(self, seconds: float, prompt_tokens: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def inter_token(self, seconds: float) -> None:
        pass

    def finished(self, reason: str, prompt_tokens: int, generation_tokens: int) -> None:
        pass


NULL_OBSERVER = NullObserver()
