"""Translate a wire ``CompletionRequest`` into engine requests: one :class:`GenerationRequest` per
prompt, sampling settings as for chat (``chat_params.generation_request``), and each prompt's text when
the request asks for ``echo``.

String prompts are tokenized as they are (with the tokenizer's special tokens unless
``add_special_tokens`` is false), never through a chat template; token-id prompts are checked against
the vocabulary. A string prompt whose UTF-8 size alone proves it cannot fit the context is refused
before tokenizing (``chat_params.prompt_bytes_limit``). CPU work: callers on an event loop run it in a
worker thread.
"""

from __future__ import annotations

from typing import Any

from app.config import GenerationLimits
from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol.completions import CompletionRequest
from app.protocol.sampling import text_size_over
from deployments.engines.chat_params import generation_request, prompt_bytes_limit
from deployments.engines.prepared import Prepared
from deployments.engines.structured_params import request_grammar


def prompt_ids(request: CompletionRequest, tokenizer: Any, context_len: int, vocab_size: int) -> list[list[int]]:
    """Each prompt's token ids (see the module docstring); InvalidRequest names the prompt at fault."""
    limit = prompt_bytes_limit(tokenizer, context_len)
    request.check_context(context_len)  # token-id prompts longer than the context, before reading any
    out = []
    for k, prompt in enumerate(request.prompts):
        param = request.prompt_param_of(k)
        if isinstance(prompt, str):
            if text_size_over([prompt], limit) is not None:
                raise ContextLengthExceeded.text_too_long(context_len, len(prompt), param)
            out.append(tokenizer(prompt, add_special_tokens=request.add_special_tokens)["input_ids"])
        else:
            bad = next((i for i in prompt if i >= vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"{param} names token id {bad}, outside this model's vocabulary "
                                     f"(0..{vocab_size - 1})", param=param)
            out.append(list(prompt))
    return out


def prepare_completion(request: CompletionRequest, engine: Any, limits: GenerationLimits,
                       tokenizer: Any = None) -> Prepared:
    """The completions request as engine requests, one per prompt (see the module docstring)."""
    tokenizer = tokenizer or engine.tokenizer
    request.check_limits(limits)  # n, stop strings, max_tokens: before any prompt is tokenized
    ids = prompt_ids(request, tokenizer, engine.context_len, engine.vocab_size)
    requests = [generation_request(request, p, limits, engine.context_len, vocab_size=engine.vocab_size)
                for p in ids]
    grammar = request_grammar(request, engine)  # compiled once the cheaper checks passed
    for r in requests:
        r.grammar = grammar
    echo = []
    if request.echo:
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in request.prompts]
    return Prepared(requests, echo)
