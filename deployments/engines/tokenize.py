"""``/tokenize`` and ``/detokenize`` in the replica: the model's own tokenizer and chat template, with
the same size bound and rendering as generation (so a count here is the count generation will see)."""

from __future__ import annotations

from typing import Any, Callable

from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from deployments.engines.chat_params import message_tokens, prompt_bytes_limit, render_prompt, render_text
from deployments.engines.records import DetokenizeResult, TokenizeResult
from deployments.engines.vision import with_images


def tokenize(request: TokenizeRequest, engine: Any, limits: Any, tokenizer: Any) -> TokenizeResult:
    """The prompt's (or rendered messages') token ids. Text that cannot fit the context by its size
    alone, or messages beyond the model's ``max_messages`` or too many to fit, are refused before the
    template or the tokenizer runs, as generation refuses them; images count as the tokens
    the model's processor expands them into (and are refused where generation refuses them)."""
    chars = request.text_size_over(prompt_bytes_limit(tokenizer, engine.context_len))
    if chars is not None:
        raise ContextLengthExceeded.text_too_long(engine.context_len, chars, request.prompt_param)
    parts = getattr(engine, "content_parts", False)
    if request.messages is not None:  # the messages' count and structure, before the template renders them
        request.chat_request().check_limits(limits)
        request.chat_request().check_context(engine.context_len, message_tokens(tokenizer, parts))
    if request.prompt is not None:
        special = True if request.add_special_tokens is None else request.add_special_tokens
        ids = tokenizer(request.prompt, add_special_tokens=special)["input_ids"]
    elif images := request.images():
        ids, _, _ = with_images(engine, render_text(tokenizer, request.chat_request(), parts), images, limits)
    else:
        ids = render_prompt(tokenizer, request.chat_request(), add_special_tokens=bool(request.add_special_tokens),
                            parts=parts)
    strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResult(tokens=list(ids), max_model_len=engine.context_len, token_strs=strs)


def detokenize(request: DetokenizeRequest, engine: Any, limits: Any, tokenizer: Any) -> DetokenizeResult:
    bad = next((i for i in request.tokens if i >= engine.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"tokens names token id {bad}, outside this model's vocabulary "
                             f"(0..{engine.vocab_size - 1})", param="tokens")
    return DetokenizeResult(prompt=tokenizer.decode(request.tokens))


# What each request type runs.
TOKENIZERS: dict[type, Callable[..., Any]] = {TokenizeRequest: tokenize, DetokenizeRequest: detokenize}


def run_tokenizer(request: Any, engine: Any, limits: Any, tokenizer: Any = None) -> Any:
    """Answer a tokenize or detokenize request with ``tokenizer`` (default the engine's), under the
    model's generation ``limits`` (its image limits)."""
    return TOKENIZERS[type(request)](request, engine, limits, tokenizer or engine.tokenizer)
