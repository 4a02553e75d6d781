"""API keys (README: Authentication): optional, off by default.

The config names where keys are (:class:`AuthSpec`): an environment variable of the ingress's process, a
file, or both; never a key itself, so a config can be shown, committed and logged. A key file holds one
key per line, alone (every model) or followed by the models it may use::

    # team-a may use every model; the demo key two models only
    sk-team-a-2f9c...
    sk-demo-81ab...  demo-chat  all-MiniLM-L6-v2

:class:`KeyRing` keeps only SHA-256 digests and compares a presented key's digest with every stored one
in constant time (``hmac.compare_digest``, no early exit), so neither a key nor which key matched can be
learnt from response times. A key that may not use a model gets the 404 of an unknown model, so model
names do not leak (``app/ingress.py``); ``/health`` and the playground's static files (``/``,
``/playground`` and its script and stylesheet: the same bytes for everyone, no data) are the only routes
open without a key (``app/middleware.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field

# Characters a key may hold: what the openai SDK sends in a header, without separators of the key file.
_KEY = re.compile(r"[\x21-\x7e]{8,512}")


class AuthSpec(BaseModel):
    """Where the ingress reads API keys from; keys are required when either is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
        "Name of an environment variable of the ingress's process holding API keys, separated by commas "
        "or whitespace; each may use every model. Set it where Ray starts (in runtime_env it would put the "
        "keys in the config)."))
    api_keys_file: str | None = Field(None, min_length=1, description=(
        "Path of a file of API keys on the ingress's node: one per line, alone (every model) or followed "
        "by the model ids it may use; blank lines and `#` comments are skipped."))

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


@dataclass(frozen=True)
class Grant:
    """What one key may do: use ``models`` (None: every model)."""

    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


EVERYTHING = Grant()


def parse_key_file(text: str, where: str = "api_keys_file") -> dict[str, Grant]:
    """``{key: grant}`` of a key file's text; ValueError naming the line of a malformed key (never the key)."""
    keys: dict[str, Grant] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        key, models = words[0], words[1:]
        if not _KEY.fullmatch(key):
            raise ValueError(f"{where}, line {number}: a key is 8 to 512 printable ASCII characters")
        if key in keys:
            raise ValueError(f"{where}, line {number}: the same key again")
        keys[key] = Grant(frozenset(models)) if models else EVERYTHING
    return keys


def parse_env_keys(value: str, where: str) -> dict[str, Grant]:
    keys = [k for k in re.split(r"[\s,]+", value) if k]
    for k in keys:
        if not _KEY.fullmatch(k):
            raise ValueError(f"{where}: a key is 8 to 512 printable ASCII characters")
    return dict.fromkeys(keys, EVERYTHING)


class KeyRing:
    """The accepted keys, as digests; :meth:`grant` authenticates a presented key."""

    def __init__(self, keys: Mapping[str, Grant]) -> None:
        self._entries = [(_digest(key), grant) for key, grant in keys.items()]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, spec: AuthSpec, environ: Mapping[str, str] | None = None) -> "KeyRing | None":
        """The keys ``spec`` names (None when auth is off). ValueError when it is on and no key is found:
        a server told to require keys never starts open."""
        if not spec.enabled:
            return None
        environ = os.environ if environ is None else environ
        keys: dict[str, Grant] = {}
        if spec.api_keys_env:
            where = f"ingress.auth.api_keys_env ({spec.api_keys_env})"
            keys.update(parse_env_keys(environ.get(spec.api_keys_env, ""), where))
        if spec.api_keys_file:
            try:
                text = Path(spec.api_keys_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"ingress.auth.api_keys_file: cannot read {spec.api_keys_file} "
                                 f"({type(exc).__name__})") from None
            keys.update(parse_key_file(text, f"ingress.auth.api_keys_file {spec.api_keys_file}"))
        if not keys:
            raise ValueError("ingress.auth is set but names no key: the environment variable is unset or "
                             "empty and the file holds none")
        return cls(keys)

    def grant(self, presented: str | None) -> Grant | None:
        """The grant of ``presented``, or None if it is no key of this ring. Every stored digest is
        compared, whichever matches."""
        if not presented:
            return None
        digest, found = _digest(presented), None
        for stored, grant in self._entries:
            if hmac.compare_digest(digest, stored):
                found = grant
        return found


def presented_key(headers: Mapping[bytes, bytes]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` (what the openai SDK sends), else
    ``x-api-key: <key>`` (Anthropic-style clients)."""
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip() or None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
