"""What the text-generation endpoint families share on the ingress side: they call a chat model's
``generate`` method (``deployments/llm.py``, ``deployments/multiplexed.py``), refuse a huge prompt
before sending it, and make its images ready to travel (``app/images.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from app.errors import ContextLengthExceeded, validation_error
from app.images import check_image_count, resolve_images
from app.serving.base import OFF_LOOP_BYTES, Inbound, Serving, maybe_off_loop


def by_choice(batch: list[Any]) -> dict[int, list[Any]]:
    """One message of deltas grouped by choice, in order of first appearance."""
    groups: dict[int, list[Any]] = {}
    for delta in batch:
        groups.setdefault(delta.index, []).append(delta)
    return groups


class GenerationServing(Serving):
    """Base of the chat, completions and responses families (and of tokenize, which shares the size
    screen): a chat model's deployment, its prompt limits asked once per model."""

    task = "chat"
    method = "generate"

    def __init__(self) -> None:
        self._limits: dict[str, dict[str, Any]] = {}  # model id -> its deployment's prompt_limits()

    def generation_request(self, body: Any) -> Any:
        """The request the model runs (default ``body``; a responses request runs as a chat request):
        validated here, and what the size screen measures (its ``text_size_over``, ``prompt_param``)."""
        return body

    async def validate(self, inbound: Inbound, spec: Any) -> Any:
        """The body, and the request it runs as, both valid (a 400 names the first bad field)."""
        body = await super().validate(inbound, spec)
        try:
            self.generation_request(body)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        return body

    async def screen(self, body: Any, inbound: Inbound, spec: Any, deployment: Any) -> None:
        """Refuse a request beyond the model's limits or too large for its context (:meth:`screen_size`),
        then check the request's image parts against the ingress's policy and fetch or read their web and
        file URLs into the request that is sent (``generation_request(body)``, the object ``args`` sends:
        a 400 names a bad part)."""
        await self.screen_size(body, inbound, spec, deployment)
        request = self.generation_request(body)
        if (images := getattr(request, "images", None)) is not None and spec is not None:
            check_image_count(images(), spec.limits.max_images_per_request)  # before fetching any
        await resolve_images(request, inbound.images)

    async def screen_size(self, body: Any, inbound: Inbound, spec: Any, deployment: Any) -> None:
        """Every request: the model's structural limits (``check_limits``: choices, stop strings,
        max_tokens, messages; O(structure), from the config). A large body also: a prompt text longer
        than the model's context can hold (by UTF-8 size, see the deployment's ``prompt_limits``) and a
        structure that cannot fit it (``check_context``: messages that each render to some tokens,
        token-id prompts), and tools whose text cannot (when the template writes them) are refused
        here: sending megabytes to the replica only for it to refuse them costs both processes seconds
        of event loop. The replica applies the same checks again, before
        its chat template runs."""
        request = self.generation_request(body)
        if (check_limits := getattr(request, "check_limits", None)) is not None and spec is not None:
            check_limits(spec.limits)
        if inbound.size <= OFF_LOOP_BYTES:
            return  # cheap to send; the replica checks it
        limits = self._limits.get(spec.id)
        if limits is None:
            limits = self._limits[spec.id] = await deployment.prompt_limits.remote()
        chars = await maybe_off_loop(inbound.size, request.text_size_over, limits["prompt_bytes"])
        if chars is not None:
            raise ContextLengthExceeded.text_too_long(limits["context_len"], chars, request.prompt_param)
        if (check_context := getattr(request, "check_context", None)) is not None:
            check_context(limits["context_len"], limits.get("message_tokens", 0.0))
        if limits.get("renders_tools") and getattr(request, "tools", None):
            chars = await maybe_off_loop(inbound.size, request.tools_size_over, limits["prompt_bytes"])
            if chars is not None:
                raise ContextLengthExceeded.text_too_long(limits["context_len"], chars, "tools")
