"""Which function turns a generation endpoint's wire request into a :class:`Prepared` (a lookup by the
request's type). CPU work (templates, tokenizers): callers on an event loop run it in a worker thread."""

from __future__ import annotations

from typing import Any, Callable

from app.protocol.chat import ChatCompletionRequest
from app.protocol.completions import CompletionRequest
from deployments.engines.chat_params import prepare_chat
from deployments.engines.completion_params import prepare_completion
from deployments.engines.prepared import Prepared

PREPARERS: dict[type, Callable[..., Prepared]] = {
    ChatCompletionRequest: prepare_chat,
    CompletionRequest: prepare_completion,
}


def prepare(request: Any, engine: Any, limits: Any, tokenizer: Any = None) -> Prepared:
    """``request`` prepared by its family's preparer, with ``tokenizer`` (default the engine's)."""
    return PREPARERS[type(request)](request, engine, limits, tokenizer)
