"""``/tokenize`` and ``/detokenize`` on the ingress side: one record from a chat model's ``tokenize``
method, answered as JSON (never streamed). :data:`TOKENIZE` and :data:`DETOKENIZE` are the route table's
serving objects."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from pydantic import BaseModel

from app.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from app.serving.generation import GenerationServing


class TokenizerServing(GenerationServing):
    """A request answered by the model's tokenizer: ``answer`` turns its one record into the body."""

    method = "tokenize"

    def __init__(self, request_model: type[BaseModel], answer: Callable[[Any], BaseModel]) -> None:
        super().__init__()
        self.request_model = request_model
        self._answer = answer

    def generation_request(self, body: Any) -> Any:
        """Chat messages are rendered as a chat request: they must be valid as one."""
        return body.chat_request() if getattr(body, "messages", None) is not None else body

    def streams(self, body: Any) -> bool:
        return False

    async def chunks(self, records: AsyncIterator[list[Any]], body: Any) -> AsyncIterator[BaseModel]:
        async for batch in records:
            for record in batch:
                yield self._answer(record)

    async def collect(self, chunks: AsyncIterator[BaseModel], body: Any) -> BaseModel:
        answers = [c async for c in chunks]
        assert len(answers) == 1, "a tokenize call answers once"
        return answers[0]


TOKENIZE = TokenizerServing(TokenizeRequest, lambda r: TokenizeResponse(
    count=len(r.tokens), max_model_len=r.max_model_len, tokens=r.tokens, token_strs=r.token_strs))
DETOKENIZE = TokenizerServing(DetokenizeRequest, lambda r: DetokenizeResponse(prompt=r.prompt))
