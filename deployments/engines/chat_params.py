"""Translate a wire ``ChatCompletionRequest`` into a :class:`GenerationRequest` for the engine.

This is where OpenAI's parameter semantics meet the model: the chat template renders the messages,
lengths are checked against the context, defaults are filled in. Errors are raised as
:class:`InvalidRequest` / :class:`ContextLengthExceeded` naming the parameter.

:func:`to_generation_request` is CPU work proportional to the prompt (template, tokenizer): callers on
an event loop run it in a worker thread. Before any of that, a prompt whose UTF-8 size alone proves it
cannot fit the context is refused in time proportional to the number of messages (see
:func:`prompt_bytes_limit`), and so is one beyond the model's limits or whose messages cannot fit by
their count (each renders to at least :func:`message_tokens`), so a huge body costs the replica almost
nothing; a rendered prompt too long by its size is refused before it is tokenized (:func:`rendered_too_long`).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

from app.config import GenerationLimits
from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol.chat import ChatCompletionRequest
from app.protocol.sampling import SamplingRequest, text_size_over
from deployments.engines.prepared import Prepared
from deployments.engines.records import GenerationRequest, SamplingParams
from deployments.engines.structured_params import output_parser, request_grammar
from deployments.engines.vision import with_images


@functools.lru_cache(maxsize=16)
def _longest_token_bytes(tokenizer: Any) -> int:
    return max((len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab()), default=1)


def _normalizer_shrink(tokenizer: Any) -> int:
    """How many bytes of input one byte of normalized text may stand for: 1 without a normalizer; 4
    with one (Unicode normalization maps a 4-byte character to a 1-byte one at most) or when unknown."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return 1 if backend is not None and backend.normalizer is None else 4


def prompt_bytes_limit(tokenizer: Any, context_len: int) -> int:
    """Most UTF-8 bytes of message text that could still fit ``context_len`` tokens.

    No token's text is longer than the longest vocabulary entry (byte-level markers and sentencepiece's
    '▁' only make entries longer than the text they stand for), so text of more bytes than this needs
    more tokens than the context holds. This holds for tokenizers that keep every input byte (byte-level
    BPE, sentencepiece: what chat models use), with a factor for a normalizer's shrinking.
    """
    return context_len * _longest_token_bytes(tokenizer) * _normalizer_shrink(tokenizer)


RENDERED_CHECK_CHARS = 1 << 16  # a rendered prompt longer than this is size-checked before it is tokenized

# Roles a message may have; every ordered pair of them is rendered to measure what a message costs.
_ROLES = ("system", "developer", "user", "assistant", "tool")


def message_tokens(tokenizer: Any, parts: bool = False) -> float:
    """A lower bound of the tokens any one message adds to the prompt, whatever its role and content,
    with the tokenizer's chat template (measured once per tokenizer and template).

    For every ordered pair of roles (r, q) after each of two openings (a user message; the same and an
    assistant tool call), the conversation with ``(r, q)`` twice against once, empty contents, halved;
    the least over what the template renders (an order it refuses cannot be repeated). A difference
    counts its added tokens (special tokens: matched before anything else, so no neighbouring text
    merges into them) plus its other text's UTF-8 bytes over the bytes one token can spell
    (:func:`prompt_bytes_limit`). 0 when some role renders to nothing (then only
    ``limits.max_messages`` bounds the messages) or when nothing could be measured.
    """
    try:
        return _message_tokens(tokenizer, str(getattr(tokenizer, "chat_template", None)), parts)
    except Exception:  # not a tokenizer with a vocabulary and a chat template: no bound
        return 0.0


@functools.lru_cache(maxsize=16)
def _message_tokens(tokenizer: Any, template: str, parts: bool) -> float:
    added = {str(token): i for i, token in tokenizer.added_tokens_decoder.items()}
    by_length, added_ids, per_byte = sorted(added, key=len, reverse=True), set(added.values()), \
        1 / prompt_bytes_limit(tokenizer, 1)

    def cost(messages: list[dict[str, Any]]) -> float:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        specials = sum(i in added_ids for i in tokenizer(text, add_special_tokens=False)["input_ids"])
        for token in by_length:
            text = text.replace(token, "")
        return specials + len(text.encode("utf-8", "surrogatepass")) * per_byte

    def message(role: str) -> dict[str, Any]:
        return {"role": role, "content": [] if parts else "", **({"tool_call_id": "0"} if role == "tool" else {})}

    user = {"role": "user", "content": [{"type": "text", "text": "x"}] if parts else "x"}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "0", "type": "function", "function": {"name": "f", "arguments": {}}}]}
    costs = []
    for opening in ([user], [user, call]):
        for pair in ([message(r), message(q)] for r in _ROLES for q in _ROLES):
            try:
                costs.append((cost([*opening, *pair, *pair]) - cost([*opening, *pair])) / 2)
            except Exception:  # the template refuses this order of roles (jinja's raise_exception)
                continue
    return max(0.0, min(costs, default=0.0))


def renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template writes each tool's name, description and parameters' names and
    descriptions into the prompt, so that their text counts against the context as the messages' does
    (``ChatCompletionRequest.tools_size_over``); measured once per tokenizer and template."""
    try:
        return _renders_tools(tokenizer, str(getattr(tokenizer, "chat_template", None)))
    except Exception:  # not a tokenizer with a chat template
        return False


@functools.lru_cache(maxsize=16)
def _renders_tools(tokenizer: Any, template: str) -> bool:
    marks = ("fn_q7z", "about_q7z", "prop_q7z", "prop_about_q7z")
    tool = {"type": "function", "function": {"name": marks[0], "description": marks[1], "parameters": {
        "type": "object", "properties": {marks[2]: {"type": "string", "description": marks[3]}}}}}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[tool], tokenize=False)
    return all(mark in text for mark in marks)


def prompt_limits(engine: Any) -> dict[str, Any]:
    """``{"context_len": tokens, "prompt_bytes": most UTF-8 bytes of message text that can fit,
    "message_tokens": least tokens any message renders to, "renders_tools": whether the tools' text
    counts}`` of a chat engine: what a deployment tells the ingress so it can refuse larger prompts
    itself (``SamplingRequest.check_context``, ``tools_size_over``)."""
    return {"context_len": engine.context_len,
            "prompt_bytes": prompt_bytes_limit(engine.tokenizer, engine.context_len),
            "message_tokens": message_tokens(engine.tokenizer, getattr(engine, "content_parts", False)),
            "renders_tools": renders_tools(engine.tokenizer)}


def _check_prompt_size(request: SamplingRequest, tokenizer: Any, context_len: int) -> None:
    """ContextLengthExceeded if the messages' UTF-8 size alone proves they cannot fit ``context_len``;
    never calls the tokenizer (only its vocabulary, once per tokenizer)."""
    chars = request.text_size_over(prompt_bytes_limit(tokenizer, context_len))
    if chars is not None:
        raise ContextLengthExceeded.text_too_long(context_len, chars, request.prompt_param)


def _check_tools_size(request: ChatCompletionRequest, tokenizer: Any, context_len: int) -> None:
    """ContextLengthExceeded naming ``tools`` if the template writes them whole and their text alone
    cannot fit ``context_len`` (measured and cached once per tokenizer and template)."""
    if request.tools and renders_tools(tokenizer):
        chars = request.tools_size_over(prompt_bytes_limit(tokenizer, context_len))
        if chars is not None:
            raise ContextLengthExceeded.text_too_long(context_len, chars, "tools")


@functools.lru_cache(maxsize=16)
def _reserved_template_kwargs(tokenizer_type: type) -> frozenset[str]:
    """Names chat_template_kwargs may not use: the arguments of ``apply_chat_template`` itself (a
    client must not swap the template or the output type) and the variables it sets."""
    parameters = inspect.signature(tokenizer_type.apply_chat_template).parameters
    named = {name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return frozenset(named | {"messages", "conversation", "conversations", "self"})


def _arguments(text: str) -> Any:
    """A call's arguments as the template expects them: a JSON object as a dict (templates such as
    Llama 3's apply ``tojson`` to it), anything else as the text it is."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting is not a dict a template reads
        return text
    return value if isinstance(value, dict) else text


def _parts(message: Any) -> list[dict[str, Any]]:
    """A message's content as a vision-language model's template reads it: text and image parts in
    order (an image as ``{"type": "image"}``: the template writes the model's placeholder for it)."""
    if isinstance(message.content, list):
        return [{"type": "image"} if p.type == "image_url" else {"type": "text", "text": p.text or ""}
                for p in message.content]
    return [{"type": "text", "text": message.content}] if message.content else []


def _template_message(message: Any, parts: bool = False) -> dict[str, Any]:
    """A wire message as chat templates read it (OpenAI's shape, arguments parsed); content as parts
    for a vision-language model's template (``parts``), else as one string."""
    out: dict[str, Any] = {"role": message.role, "content": _parts(message) if parts else message.text()}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in message.tool_calls]
    return out


def render_prompt(tokenizer: Any, request: ChatCompletionRequest, add_special_tokens: bool = False,
                  parts: bool = False, context_len: int | None = None) -> list[int]:
    """Token ids of :func:`render_text`'s prompt. The template already wrote any BOS/special tokens:
    they are not added twice (unless asked: /tokenize). With ``context_len``, a rendered prompt too long
    for it by its size is refused before it is tokenized (:func:`rendered_too_long`)."""
    text = render_text(tokenizer, request, parts)
    if context_len is not None and (refusal := rendered_too_long(text, tokenizer, context_len)) is not None:
        del text  # not kept alive by the refusal's traceback
        raise refusal
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def rendered_too_long(text: str, tokenizer: Any, context_len: int) -> ContextLengthExceeded | None:
    """The refusal of a rendered prompt that is long (over RENDERED_CHECK_CHARS: shorter ones tokenize
    in milliseconds and get the exact count, images' tokens included) and whose UTF-8 size proves it
    cannot fit ``context_len``; else None. The template also writes what the message-text bound does
    not count (tool calls' arguments, chat_template_kwargs' values, tools it writes in part): rendering
    them is string work, tokenizing them is what costs."""
    chars = text_size_over([text], prompt_bytes_limit(tokenizer, context_len)) \
        if len(text) > RENDERED_CHECK_CHARS else None
    if chars is None:
        return None
    return ContextLengthExceeded(f"This model's maximum context length is {context_len} tokens, but the prompt "
                                 f"rendered from the messages (tools included) holds {chars} characters, more "
                                 f"than any {context_len} tokens can spell.", param="messages")


def render_text(tokenizer: Any, request: ChatCompletionRequest, parts: bool = False) -> str:
    """The messages rendered with the tokenizer's chat template: with the generation prompt
    (``add_generation_prompt``, default) or continuing the final assistant message
    (``continue_final_message``), the request's ``tools`` (the template's ``tools`` variable) and its
    ``chat_template_kwargs`` as template variables; content as parts when ``parts`` (see
    :func:`_template_message`)."""
    messages = [_template_message(m, parts) for m in request.messages]
    extra = dict(request.chat_template_kwargs or {})
    clash = sorted(extra.keys() & _reserved_template_kwargs(type(tokenizer)))
    if clash:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(map(repr, clash))}: these are "
                             "arguments of the template call itself (use the request's own "
                             "add_generation_prompt / continue_final_message)", param="chat_template_kwargs")
    if request.tools:
        extra["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=request.add_generation_prompt,
                                             continue_final_message=request.continue_final_message, **extra)
    except Exception as exc:  # templates raise for unsupported roles/orders (jinja's raise_exception)
        raise InvalidRequest(f"the messages cannot be rendered with this model's chat template: {exc}",
                             param="messages") from None


def _token_ids(ids: Any, vocab_size: int, param: str) -> None:
    bad = next((i for i in ids if not 0 <= int(i) < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{param} names token id {bad}, outside this model's vocabulary "
                             f"(0..{vocab_size - 1})", param=param)


def to_generation_request(request: ChatCompletionRequest, engine: Any, limits: GenerationLimits,
                          tokenizer: Any = None) -> GenerationRequest:
    """Render and tokenize the prompt with ``tokenizer`` (default ``engine.tokenizer``; a copy of it
    for a thread of its own), validate lengths and counts against ``engine.context_len`` and ``limits``,
    fill OpenAI's defaults."""
    context_len, tokenizer = engine.context_len, tokenizer or engine.tokenizer
    parts, images = getattr(engine, "content_parts", False), request.images()
    # Size and structure first, then the template; its output's size before the tokenizer.
    _check_prompt_size(request, tokenizer, context_len)
    request.check_limits(limits)
    request.check_context(context_len, message_tokens(tokenizer, parts))
    _check_tools_size(request, tokenizer, context_len)
    if images:  # the processor tokenizes: it expands each image's placeholder into the image's tokens
        text = render_text(tokenizer, request, parts)
        if (refusal := rendered_too_long(text, tokenizer, context_len)) is not None:
            del text
            raise refusal
        ids, inputs, note = with_images(engine, text, images, limits)
    else:
        ids, inputs, note = render_prompt(tokenizer, request, parts=parts, context_len=context_len), None, ""
    out = generation_request(request, ids, limits, context_len, vocab_size=engine.vocab_size, note=note)
    out.images = inputs
    out.grammar = request_grammar(request, engine)  # compiled once the cheaper checks passed
    return out


def prepare_chat(request: ChatCompletionRequest, engine: Any, limits: GenerationLimits,
                 tokenizer: Any = None) -> Prepared:
    """The chat request as one engine request (its echo is the ingress's: see ``echo_text``), its
    output parsed into tool calls when it has tools."""
    return Prepared([to_generation_request(request, engine, limits, tokenizer)],
                    tool_format=output_parser(request, engine))


def generation_request(request: SamplingRequest, prompt_ids: list[int], limits: GenerationLimits,
                       context_len: int, vocab_size: int | None = None, note: str = "") -> GenerationRequest:
    """Validate lengths and counts of an already tokenized prompt, and the token ids the request names
    (logit_bias, stop_token_ids) against ``vocab_size``; fill OpenAI's defaults. Errors name where the
    prompt came from (the request's ``prompt_param``: ``messages``, ``prompt``); a context-length error
    adds ``note`` to the prompt's token count (how many of them images take)."""
    request.check_limits(limits)  # n, stop strings, max_tokens (callers checked them before rendering too)
    stops = request.stop_list
    prompt_param = request.prompt_param
    prompt_len = len(prompt_ids)
    if not prompt_len:  # e.g. a custom chat template that renders these messages as ""
        raise InvalidRequest(f"the {prompt_param} make an empty prompt with this model's tokenizer (and chat "
                             "template): there is nothing to continue", param=prompt_param)
    room = context_len - prompt_len
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_len} tokens, but the {prompt_param} use "
            f"{prompt_len} tokens{note}, leaving no room for a completion.", param=prompt_param)
    asked = request.requested_max_tokens
    param = request.max_tokens_param
    if asked is not None and asked > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_len} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the {prompt_param}{note}, {asked} in the completion). "
            f"Please reduce the length of the {prompt_param} or the completion.", param=param)
    max_new_tokens = asked if asked is not None else min(limits.default_max_tokens, room)
    if (request.min_tokens or 0) > max_new_tokens:
        raise InvalidRequest(f"min_tokens ({request.min_tokens}) must be at most the completion's maximum "
                             f"length ({max_new_tokens})", param="min_tokens")
    bias = tuple((int(token), value) for token, value in (request.logit_bias or {}).items())
    stop_ids = tuple(request.stop_token_ids or ())
    if vocab_size is not None:
        _token_ids((token for token, _ in bias), vocab_size, "logit_bias")
        _token_ids(stop_ids, vocab_size, "stop_token_ids")
    temperature = 1.0 if request.temperature is None else request.temperature
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(0, request.top_k or 0),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        seed=request.seed,
        stop=tuple(stops),
        min_p=request.min_p or 0.0,
        logit_bias=bias,
        min_tokens=request.min_tokens or 0,
        ignore_eos=request.ignore_eos,
        stop_token_ids=stop_ids,
        logprobs=request.top_logprobs_asked,
    )
    return GenerationRequest(prompt_ids=list(prompt_ids), params=params, n=request.n)
