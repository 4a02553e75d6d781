"""API keys on a real server: a second application beside the session's, whose ingress reads a key file
(one key for every model, one for a single model), through the openai SDK and raw HTTP."""

import httpx
import openai
import pytest
import requests
from ray import serve

pytestmark = pytest.mark.integration

ALL_KEY, CHAT_ONLY_KEY = "sk-auth-test-everything-0001", "sk-auth-test-chat-only-0002"


@pytest.fixture(scope="module")
def auth_app(server, tmp_path_factory):
    from app.builder import compose_app

    keys = tmp_path_factory.mktemp("auth") / "api_keys"
    keys.write_text(f"# test keys\n{ALL_KEY}\n{CHAT_ONLY_KEY}  auth-chat\n")
    args = {"models": [{"id": "auth-chat", "source": "demo:chat", "task": "chat"},
                       {"id": "auth-chat-2", "source": "demo:chat", "task": "chat"}],
            "ingress": {"auth": {"api_keys_file": str(keys)}, "max_request_body_bytes": 4096}}
    options = {"auth-chat": {"ray_actor_options": {"num_cpus": 0.1}},
               "auth-chat-2": {"ray_actor_options": {"num_cpus": 0.1}},
               "OpenAIIngress": {"ray_actor_options": {"num_cpus": 0.1}}}
    serve.run(compose_app(args, options), name="auth", route_prefix="/auth")
    yield f"{server}/auth"
    serve.delete("auth")


def sdk(base, key):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def ask(client, model="auth-chat", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, **kwargs)


def test_the_sdk_without_the_right_key_gets_an_authentication_error(auth_app):
    for key in ("", "sk-not-a-key-at-all", CHAT_ONLY_KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(sdk(auth_app, key or "unset"))
        assert caught.value.body["code"] == "invalid_api_key"
    assert ask(sdk(auth_app, ALL_KEY)).choices[0].finish_reason in ("stop", "length")
    chunks = list(ask(sdk(auth_app, ALL_KEY), stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_x_api_key_and_bearer_headers_both_work_and_nothing_else_does(auth_app):
    body = {"model": "auth-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{auth_app}/v1/chat/completions"
    assert requests.post(url, json=body, headers={"x-api-key": ALL_KEY}, timeout=60).status_code == 200
    assert requests.post(url, json=body, headers={"Authorization": f"Bearer {ALL_KEY}"}, timeout=60).status_code == 200
    for headers in ({}, {"Authorization": f"Basic {ALL_KEY}"}, {"Authorization": ALL_KEY}):
        resp = requests.post(url, json=body, headers=headers, timeout=60)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", headers
    # Refused before the body is read: a body over the limit without a key is a 401, not a 413.
    resp = requests.post(url, data=b"x" * 5000, timeout=60, headers={"content-type": "application/json"})
    assert resp.status_code == 401
    resp = requests.post(url, data=b"x" * 5000, timeout=60, headers={"x-api-key": ALL_KEY})
    assert resp.status_code == 413


def test_a_key_limited_to_one_model_sees_others_as_unknown(auth_app):
    limited = sdk(auth_app, CHAT_ONLY_KEY)
    assert ask(limited).choices
    with pytest.raises(openai.NotFoundError) as refused:
        ask(limited, model="auth-chat-2")
    with pytest.raises(openai.NotFoundError) as unknown:
        ask(limited, model="auth-chat-3")
    assert refused.value.body == {**unknown.value.body,
                                  "message": unknown.value.body["message"].replace("auth-chat-3", "auth-chat-2")}
    assert [m.id for m in limited.models.list()] == ["auth-chat"]
    with pytest.raises(openai.NotFoundError):
        limited.models.retrieve("auth-chat-2")
    assert {m.id for m in sdk(auth_app, ALL_KEY).models.list()} == {"auth-chat", "auth-chat-2"}


def test_health_stays_open_and_names_models_only_to_a_key(auth_app):
    anonymous = httpx.get(f"{auth_app}/health", timeout=30)
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    keyed = httpx.get(f"{auth_app}/health", headers={"x-api-key": ALL_KEY}, timeout=30).json()
    assert set(keyed["models"]) == {"auth-chat", "auth-chat-2"}
    assert httpx.get(f"{auth_app}/docs", timeout=30).status_code == 401
    assert httpx.get(f"{auth_app}/no-such-route", timeout=30).status_code == 401
