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
        self._limits: dict[str, dict[str, int]] = {}  # model id -> its deployment's prompt_limits()

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
        """Refuse a prompt too large for the model (:meth:`screen_size`), then check the request's image
        parts against the ingress's policy and fetch or read their web and file URLs into the request
        that is sent (``generation_request(body)``, the object ``args`` sends: a 400 names a bad part)."""
        await self.screen_size(body, inbound, spec, deployment)
        request = self.generation_request(body)
        if images := getattr(request, "images", None):
            check_image_count(images(), spec.limits.max_images_per_request)  # before fetching any
        await resolve_images(request, inbound.images)

    async def screen_size(self, body: Any, inbound: Inbound, spec: Any, deployment: Any) -> None:
        """A large body whose prompt text is longer than the model's context can hold (by UTF-8 size,
        see the deployment's ``prompt_limits``) is refused here: sending megabytes to the replica only
        for it to refuse them costs both processes seconds of event loop."""
        if inbound.size <= OFF_LOOP_BYTES:
            return  # cheap to send; the replica checks it
        limits = self._limits.get(spec.id)
        if limits is None:
            limits = self._limits[spec.id] = await deployment.prompt_limits.remote()
        request = self.generation_request(body)
        chars = await maybe_off_loop(inbound.size, request.text_size_over, limits["prompt_bytes"])
        if chars is not None:
            raise ContextLengthExceeded.text_too_long(limits["context_len"], chars, request.prompt_param)
