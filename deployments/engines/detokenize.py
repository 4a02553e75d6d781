"""Incremental detokenization with stop strings.

:class:`TextStream` turns a growing list of token ids into text pieces that are safe to send:

- byte-level BPE can split one UTF-8 character over several tokens; a piece ending in an incomplete
  character (decoded as U+FFFD) is held back until the character completes;
- text that could be the beginning of a stop string is held back until it is known not to be one; when a
  stop string appears, the text before it is released and the stop string itself never is.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"
# Decoding starts from a few prompt tokens so the first generated token sees word-boundary context
# (sentencepiece tokenizers drop a leading space when a token is decoded alone).
CONTEXT_TOKENS = 4


class TextStream:
    """Per-sequence detokenizer. Not thread-safe; one per sequence."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), prompt_ids: list[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] were decoded into text already
        self._read_offset = len(self._ids)
        self._text = ""  # all decoded text so far
        self._sent = 0  # len of text already released
        self.stopped = False  # a stop string was found

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be released now (may be '')."""
        self._ids.append(token_id)
        self._decode(partial_ok=False)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens will come: release whatever was held back (unless a stop string ended it),
        an incomplete final character included, as a one-shot decode of all tokens would."""
        if self.stopped:
            return ""
        self._decode(partial_ok=True)
        return self._release(final=True)

    def _decode(self, partial_ok: bool) -> None:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and (partial_ok or not full.endswith(_REPLACEMENT)):
            self._text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self._text)
        if self._stop:
            # Search only where a new match can start: the unsent tail, minus what a stop string spans.
            start = max(0, self._sent - max(map(len, self._stop)) + 1)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end -= self._held_back()
        piece = self._text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
