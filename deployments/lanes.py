"""Preprocessing lanes of a deployment whose requests are tokenized before the engine sees them.

Two lanes, each one thread with a tokenizer of its own: requests of at most :data:`SMALL_PROMPT_CHARS`
characters never queue behind long ones (each long one can take a tokenizer ~0.1 s, a 3.5 MB text
about 6 s). Why a tokenizer per thread: a Hugging Face fast tokenizer may reset its truncation/padding
state during a call, which another thread's call then trips over.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

Result = TypeVar("Result")

# Requests up to this many characters take the small lane (tokenized in well under 0.1 s).
SMALL_PROMPT_CHARS = 16 * 1024


class Lane:
    """One preprocessing thread and the tokenizer only it uses."""

    def __init__(self, name: str, tokenizer: Callable[[], Any]) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._make_tokenizer, self._tokenizer = tokenizer, None

    def tokenizer(self) -> Any:
        """This lane's tokenizer, made on first use (in the lane's thread: a copy is not free)."""
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer


class Lanes:
    """The small and the large lane over ``tokenizer()`` (the large lane uses it, the small a copy)."""

    def __init__(self, name: str, tokenizer: Callable[[], Any]) -> None:
        self.large = Lane(name, tokenizer)
        self.small = Lane(f"{name}-small", lambda: copy.deepcopy(tokenizer()))

    async def run(self, small: bool, fn: Callable[..., Result], *args: Any) -> Result:
        """``fn(*args, tokenizer)`` on the small lane or the large one, with that lane's tokenizer."""
        lane = self.small if small else self.large
        return await asyncio.get_running_loop().run_in_executor(lane.pool, lambda: fn(*args, lane.tokenizer()))
