"""``/tokenize`` and ``/detokenize`` wire models (vLLM's shapes, which Ray Serve LLM and llama-server
clients also read): count a prompt's tokens against the context before sending it, and back.

A tokenize request holds either a ``prompt`` (tokenized as ``/v1/completions`` tokenizes it) or chat
``messages`` (rendered with the model's chat template as ``/v1/chat/completions`` renders them).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, PrivateAttr, StrictBool, StrictInt, model_validator

from app.protocol.chat import ChatCompletionRequest, ChatMessage, check_structure
from app.protocol.common import WireModel, conflict
from app.protocol.sampling import text_size_over

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(WireModel):
    model: str = Field(min_length=1)
    prompt: str | None = Field(None, description="A completions prompt; or give `messages`.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description=(
        "Chat messages, rendered with the model's chat template; or give `prompt`."))
    add_special_tokens: StrictBool | None = Field(None, description=(
        "Let the tokenizer add its special tokens (e.g. BOS); default true for a prompt, false for "
        "messages (the chat template writes them)."))
    add_generation_prompt: StrictBool = Field(True, description="Messages: end with the assistant header.")
    continue_final_message: StrictBool = Field(False, description="Messages: continue the last one.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Messages: template variables.")
    return_token_strs: StrictBool = Field(False, description="Also return each token's string.")
    _chat: Any = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _bounded_structure(cls, data: Any) -> Any:
        """The messages' count and parts, on the raw JSON before any message validates (as chat's)."""
        if isinstance(data, dict):
            check_structure(data.get("messages"))
        return data

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise conflict("prompt", "give exactly one of 'prompt' and 'messages'")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The messages as a chat request, made once (validated as ``/v1/chat/completions`` validates
        them: pydantic's ValidationError when they are not valid there)."""
        if self._chat is None:
            self._chat = ChatCompletionRequest(model=self.model, messages=self.messages,
                                               add_generation_prompt=self.add_generation_prompt,
                                               continue_final_message=self.continue_final_message,
                                               chat_template_kwargs=self.chat_template_kwargs)
        return self._chat

    def text_size_over(self, limit_bytes: int) -> int | None:
        if self.prompt is not None:
            return text_size_over([self.prompt], limit_bytes)
        return self.chat_request().text_size_over(limit_bytes)

    def images(self) -> list[tuple[str, Any]]:
        """The messages' image parts (counted as generation counts them: deployments/engines/tokenize.py)."""
        return [] if self.prompt is not None else self.chat_request().images()

    @property
    def prompt_param(self) -> str:
        return "prompt" if self.prompt is not None else "messages"


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(WireModel):
    model: str = Field(min_length=1)
    tokens: list[Annotated[StrictInt, Field(ge=0)]] = Field(max_length=MAX_DETOKENIZE_TOKENS)

    def text_size_over(self, limit_bytes: int) -> int | None:
        return None


class DetokenizeResponse(BaseModel):
    prompt: str
