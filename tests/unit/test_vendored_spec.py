"""The vendored OpenAI spec (tests/data/openai-openapi.yaml) is the one tests/data/SOURCE.md describes,
and has not drifted from the reference copy of a sibling ../shared checkout when there is one."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tests.openapi_schema import SPEC_PATH

DATA = Path(__file__).resolve().parents[1] / "data"
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "openai-openapi.yaml"


def test_spec_path_is_the_vendored_copy():
    assert SPEC_PATH == DATA / "openai-openapi.yaml"
    assert SPEC_PATH.is_file()


def test_vendored_spec_matches_recorded_sha256():
    recorded = re.search(r"sha256 \| `([0-9a-f]{64})`", (DATA / "SOURCE.md").read_text())
    assert recorded, "tests/data/SOURCE.md must record the spec's sha256"
    assert hashlib.sha256(SPEC_PATH.read_bytes()).hexdigest() == recorded.group(1), (
        "tests/data/openai-openapi.yaml changed: update tests/data/SOURCE.md (commit, date, size, sha256)")


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"no reference copy at {REFERENCE}")
def test_vendored_spec_identical_to_shared_reference():
    assert SPEC_PATH.read_bytes() == REFERENCE.read_bytes(), (
        f"{SPEC_PATH} differs from {REFERENCE}: re-vendor it and update tests/data/SOURCE.md")
