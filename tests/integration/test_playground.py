"""The browser playground (app/playground.py, app/static/) in a real headless browser against the session's
Ray Serve: Playwright drives Debian's chromium (/usr/bin/chromium), and every answer the page shows is
checked against the same request made through the public API directly.

Without chromium or the playwright package the tests skip, except in CI (CI=true), where they fail: CI
installs chromium (.ci/run) and the `test` extra brings playwright.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

# Debian's chromium package; else whatever `chromium` is on PATH (what .ci/run checks for).
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    CHROMIUM = shutil.which("chromium") or CHROMIUM
CHAT_MODEL = "SmolLM2-135M-Instruct"  # a real model: readable text, and slow enough on CPU to stream visibly
AUDIO_MODEL = "demo-whisper"
PROMPT = "Write a short poem about the sea."
KEY = "sk-playground-test-0001"
SAMPLING = {"temperature": 0, "top_p": 1, "max_tokens": 24, "seed": 7}
TIMEOUT_MS = 60_000


def _require_browser():
    """playwright.sync_api, or skip (fail under CI=true) naming what is missing."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (Debian's chromium: apt-get install chromium)")
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        sync_api = None
        missing.append("the playwright Python package (pip install -e '.[test]')")
    if missing:
        reason = "the playground's browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must run it (.ci/run installs chromium)")
        pytest.skip(reason)
    return sync_api


@pytest.fixture(scope="module")
def browser():
    sync_api = _require_browser()
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """One page for the module's tests, in order: pickers, chat, transcription (then the screenshot), an error.
    Records every URL the page requests and every uncaught script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requests, page.script_errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.script_errors.append(str(e)))
    yield page
    context.close()


def _expect():
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)  # its own default is 5 s, too short on a busy 2-CPU machine
    return expect


def test_root_redirects_to_the_page_and_the_pickers_list_the_models(page, server):
    root = requests.get(f"{server}/", allow_redirects=False, timeout=30)
    assert root.status_code in (302, 307) and root.headers["location"] == "/playground"
    response = page.goto(f"{server}/")
    assert page.url == f"{server}/playground" and response.ok
    assert response.headers["cache-control"] == "no-cache"
    _expect()(page.locator("body")).to_have_attribute("data-models", "loaded")

    cards = {m["id"]: m for m in requests.get(f"{server}/v1/models", timeout=30).json()["data"]}
    chat = page.eval_on_selector_all("#chat-model option", "os => os.map(o => [o.value, o.textContent])")
    audio = page.eval_on_selector_all("#audio-model option", "os => os.map(o => [o.value, o.textContent])")
    assert {v for v, _ in chat} == {m for m, c in cards.items() if c.get("task") == "chat"}
    assert [v for v, _ in audio] == [m for m, c in cards.items() if c.get("task") == "transcription"]
    labels = dict(chat + audio)
    assert labels["demo-chat"] == "demo-chat (chat, ready)"
    assert labels[CHAT_MODEL] == f"{CHAT_MODEL} (chat, ready)"
    assert labels[AUDIO_MODEL] == f"{AUDIO_MODEL} (transcription, ready)"
    on_demand = [m for m, c in cards.items() if c.get("status") not in (None, "pinned") and c.get("task") == "chat"]
    assert on_demand, "the session's server allows demo-* models on demand"
    assert labels[on_demand[0]] == f"{on_demand[0]} (chat, {cards[on_demand[0]]['status']})"
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    assert page.locator("#error-bar").is_hidden()


def test_a_chat_streams_token_by_token_and_equals_the_apis_answer(page, server):
    page.select_option("#chat-model", CHAT_MODEL)
    page.fill("#system", "")
    page.fill("#temperature", str(SAMPLING["temperature"]))
    page.fill("#top-p", str(SAMPLING["top_p"]))
    page.fill("#max-tokens", str(SAMPLING["max_tokens"]))
    page.fill("#seed", str(SAMPLING["seed"]))
    # Every change of the answer's text while it streams: (its length, ms since the observer started,
    # whether the answer was still running, i.e. Stop enabled).
    page.evaluate("""() => {
        window.__growth = [];
        const t0 = performance.now();
        new MutationObserver(() => {
            const answer = document.querySelector("#messages .msg.assistant:last-child .content");
            if (answer) window.__growth.push([answer.textContent.length, performance.now() - t0,
                                              !document.getElementById("stop").disabled]);
        }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
    }""")
    # The oracle: the same request, not streamed, sent meanwhile (a greedy answer is the same batched or
    # alone, README: Tests), so that the two share the model's steps instead of taking turns.
    with ThreadPoolExecutor(1) as pool:
        oracle = pool.submit(requests.post, f"{server}/v1/chat/completions", timeout=120, json={
            "model": CHAT_MODEL, "messages": [{"role": "user", "content": PROMPT}], **SAMPLING})
        page.fill("#prompt", PROMPT)
        page.click("#send")
        _expect()(page.locator("#stats")).to_contain_text("tok/s", timeout=TIMEOUT_MS)
        expected = oracle.result().json()
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    shown = page.locator("#messages .msg.assistant .content").last.text_content()
    growth = page.evaluate("window.__growth")
    while_running = [length for length, _, running in growth if running and length]
    # Text appeared piece by piece before the answer completed, never shrinking.
    assert len(set(while_running)) >= 3, growth
    assert while_running == sorted(while_running) and max(while_running) <= len(shown)
    assert len([t for length, t, _ in growth if length]) >= 3

    assert shown == expected["choices"][0]["message"]["content"] and shown.strip()

    stats = page.inner_text("#stats")
    assert re.search(r"TTFT\s+\d+ ms", stats), stats
    tok_s = re.search(r"tok/s\s+([\d.]+)", stats)
    assert tok_s and float(tok_s.group(1)) > 0, stats
    usage = expected["usage"]
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion" in stats
    assert page.locator("#error-bar").is_hidden()
    assert page.locator("#messages .msg.user .content").last.text_content() == PROMPT


def test_a_transcription_of_an_uploaded_wav_equals_the_apis(page, server, tmp_path):
    from deployments.engines.audio import encode_audio
    from tests.integration.test_audio_api import speechlike

    wav = tmp_path / "speech.wav"
    wav.write_bytes(encode_audio(speechlike(3.0, seed=3), "wav"))
    expected = requests.post(f"{server}/v1/audio/transcriptions", timeout=120,
                             files={"file": (wav.name, wav.read_bytes(), "audio/wav")},
                             data={"model": AUDIO_MODEL, "response_format": "json"})
    assert expected.status_code == 200, expected.text

    page.select_option("#audio-model", AUDIO_MODEL)
    page.set_input_files("#audio-file", str(wav))
    _expect()(page.locator("#audio-source")).to_contain_text("speech.wav")
    page.click("#transcribe")
    _expect()(page.locator("#audio-stats")).to_contain_text("elapsed", timeout=TIMEOUT_MS)
    assert page.locator("#transcript").text_content() == expected.json()["text"]
    assert re.search(r"elapsed\s+[\d.]+ s", page.inner_text("#audio-stats"))
    assert page.locator("#error-bar").is_hidden()
    # Served over http from 127.0.0.1, a secure context: the Record button is usable.
    assert page.is_enabled("#record") and page.locator("#record-note").is_hidden()

    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    target = os.environ.get("PLAYGROUND_SCREENSHOT")
    if target:  # for the README (README: Playground)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target, full_page=True)


def test_an_api_error_is_shown_readably(page, server):
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000}
    refused = requests.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]

    page.fill("#max-tokens", "1000000")
    page.fill("#prompt", "hi")
    page.click("#send")
    error = page.locator("#error")
    _expect()(error).to_contain_text(message, timeout=TIMEOUT_MS)
    assert "HTTP 400" in error.text_content() and page.locator("#error-bar").is_visible()
    # The refused message leaves the conversation and goes back into the box, to edit and resend.
    assert page.input_value("#prompt") == "hi"
    assert page.is_enabled("#send")

    page.click("#error-close")
    assert page.locator("#error-bar").is_hidden()


def test_the_page_loaded_nothing_from_elsewhere_and_threw_nothing(page, server):
    assert page.requests, "the page made requests"
    foreign = [u for u in page.requests if not u.startswith((server + "/", "data:", "blob:"))]
    assert not foreign
    assert not page.script_errors


@pytest.fixture(scope="module")
def keyed(server, tmp_path_factory):
    """A second application beside the session's, under a route prefix and with an API key required:
    its base URL (http://127.0.0.1:PORT/keyed)."""
    from ray import serve

    from app.builder import compose_app

    keys = tmp_path_factory.mktemp("playground-keys") / "api_keys"
    keys.write_text(f"{KEY}\n")
    args = {"models": [{"id": "keyed-chat", "source": "demo:chat", "task": "chat"}],
            "ingress": {"auth": {"api_keys_file": str(keys)}}}
    options = {"keyed-chat": {"ray_actor_options": {"num_cpus": 0.1}},
               "OpenAIIngress": {"ray_actor_options": {"num_cpus": 0.1}}}
    serve.run(compose_app(args, options), name="playground-keyed", route_prefix="/keyed")
    base = f"{server}/keyed"
    # The ingress learns its model's state from Serve's status (every second): wait for "ready", which
    # the test expects the page to show.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cards = requests.get(f"{base}/v1/models", headers={"x-api-key": KEY}, timeout=30).json()["data"]
        if cards and cards[0].get("state") == "ready":
            break
        time.sleep(0.5)
    yield base
    serve.delete("playground-keyed")


def test_with_api_keys_the_page_opens_and_its_calls_send_the_typed_key(browser, keyed):
    """Under a route prefix with keys on: the page, script and stylesheet load without a key; the model
    list says which key is missing or wrong; with the right key (kept across reloads) the page works."""
    root = requests.get(f"{keyed}/", allow_redirects=False, timeout=30)
    assert root.status_code in (302, 307) and root.headers["location"] == "/keyed/playground"
    assert requests.get(f"{keyed}/v1/models", timeout=30).status_code == 401
    context = browser.new_context()
    # As on a page served over http from another host (not a secure context): no navigator.mediaDevices.
    context.add_init_script("Object.defineProperty(Navigator.prototype, 'mediaDevices', {get: () => undefined})")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{keyed}/")
        assert page.url == f"{keyed}/playground"
        error = page.locator("#error")
        _expect()(error).to_contain_text("Missing API key")
        assert "HTTP 401" in error.text_content() and "invalid_api_key" in error.text_content()
        assert page.is_disabled("#chat-model")

        page.fill("#api-key", "sk-not-the-key-0000")
        page.click("#refresh-models")
        _expect()(error).to_contain_text("Incorrect API key provided.")

        page.fill("#api-key", KEY)
        page.click("#refresh-models")
        _expect()(page.locator("#chat-model option")).to_have_text(["keyed-chat (chat, ready)"])
        assert page.locator("#error-bar").is_hidden()
        page.reload()  # the key is kept (localStorage): the list fills without typing it again
        _expect()(page.locator("#chat-model option")).to_have_text(["keyed-chat (chat, ready)"])
        assert page.input_value("#api-key") == KEY

        assert page.is_disabled("#record") and "https or localhost" in page.text_content("#record-note")

        page.fill("#max-tokens", "8")
        page.fill("#prompt", "hi")
        page.click("#send")
        _expect()(page.locator("#stats")).to_contain_text("TTFT")
        assert page.locator("#error-bar").is_hidden()
        assert page.locator("#messages .msg.assistant .content").last.text_content()
        assert not errors
    finally:
        context.close()
