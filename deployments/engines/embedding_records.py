"""What the embedding deployment streams to the ingress: plain data, standard library only.

The ingress unpickles these records and must never load torch or numpy-heavy model code
(``tests/unit/test_layout.py`` checks the rule for every records module), so a vector travels as the
bytes of its float32 values in little-endian order: compact to pickle, and already the exact payload
of OpenAI's ``encoding_format: base64``.
"""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingOutput:
    """The embedding of one input of a request.

    ``index`` is the input's position in the request; ``vector`` its float32 little-endian bytes (the
    length is 4 x dimensions); ``prompt_tokens`` the tokens the model read for it (after any truncation).
    """

    index: int
    vector: bytes
    prompt_tokens: int

    def floats(self) -> list[float]:
        """The vector as Python floats (each exactly the float32 value)."""
        values = array.array("f", self.vector)
        if sys.byteorder == "big":
            values.byteswap()
        return values.tolist()
