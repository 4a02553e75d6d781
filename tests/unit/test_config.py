"""App config: validated at build time, errors name the field."""

import pytest
from pydantic import ValidationError

from app.config import AppArgs, ChatModelSpec


def test_defaults_and_deployment_name():
    args = AppArgs.model_validate({"models": [{"id": "Qwen/Qwen2.5-0.5B-Instruct",
                                               "source": "Qwen/Qwen2.5-0.5B-Instruct"}]})
    spec = args.models[0]
    assert spec.task == "chat" and spec.dtype == "auto"
    assert spec.deployment_name == "Qwen-Qwen2.5-0.5B-Instruct"
    assert args.ingress.max_ongoing_requests >= 256


def test_task_selects_the_spec_class_and_deployment_is_explicit():
    from app.config import TranscriptionModelSpec, parse_model_spec

    args = AppArgs.model_validate({"models": [
        {"id": "c", "source": "demo:chat"},
        {"id": "w", "source": "demo:whisper", "task": "transcription", "deployment": "asr"}]})
    chat, whisper = args.models
    assert isinstance(chat, ChatModelSpec) and isinstance(whisper, TranscriptionModelSpec)
    assert whisper.deployment_name == "asr" and chat.deployment_name == "c"
    assert not hasattr(whisper.batching, "max_running_rows")
    assert parse_model_spec({"id": "c", "source": "x"}) == chat.model_copy(update={"source": "x"})


@pytest.mark.parametrize("bad,field", [
    ({"models": []}, "models"),
    ({"models": [{"id": "a", "source": "demo:chat", "dtype": "int3"}]}, "dtype"),
    ({"models": [{"id": "a", "source": "demo:chat", "batching": {"max_batch_size": 0}}]}, "max_batch_size"),
    ({"models": [{"id": "a", "source": "demo:chat", "typo_field": 1}]}, "typo_field"),
    ({"models": [{"id": "a", "source": "demo:chat"}, {"id": "a", "source": "demo:chat"}]}, "duplicate"),
    # A field the task does not use is an error, not silently ignored (config per task).
    ({"models": [{"id": "a", "source": "demo:chat", "audio": {}}]}, "audio"),
    ({"models": [{"id": "w", "source": "demo:whisper", "task": "transcription",
                  "batching": {"max_running_rows": 4}}]}, "max_running_rows"),
    ({"models": [{"id": "w", "source": "demo:whisper", "task": "transcription", "limits": {}}]}, "limits"),
    ({"models": [{"id": "a", "source": "demo:chat", "task": "image-to-audio"}]}, "task"),
    ({"models": [{"id": "a", "source": "demo:chat", "deployment": "no spaces"}]}, "deployment"),
    ({"models": [{"id": "a", "source": "demo:chat"}, {"id": "b", "source": "demo:chat", "deployment": "a"}]},
     "duplicate deployment_name"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(bad)
    assert field in str(info.value)


def test_builder_sizes_max_ongoing_with_the_batch():
    from app.builder import build_app, model_deployment

    spec = ChatModelSpec(id="m", source="demo:chat", batching={"max_batch_size": 32, "max_running_rows": 16})
    app = model_deployment(spec)
    options = app._bound_deployment._deployment_config
    assert options.max_ongoing_requests >= 32
    assert options.user_config["max_batch_size"] == 32
    assert build_app({"models": [{"id": "m", "source": "demo:chat"}]}) is not None


def test_user_config_is_validated_against_max_ongoing(monkeypatch):
    import deployments.batched as batching

    spec = ChatModelSpec(id="m", source="demo:chat", batching={"max_batch_size": 4, "max_running_rows": 16})
    monkeypatch.setattr(batching, "replica_max_ongoing_requests", lambda: 8)
    merged = batching.batching_from_user_config(spec, {"max_batch_size": 8})
    assert merged.max_batch_size == 8 and merged.max_running_rows == 16  # partial update keeps the rest
    with pytest.raises(ValueError, match=r"max_ongoing_requests \(8\) must be >= "
                                         r"user_config.max_batch_size \(9\)"):
        batching.batching_from_user_config(spec, {"max_batch_size": 9})
    with pytest.raises(ValueError, match="user_config.batch_wait_timeout_s"):
        batching.batching_from_user_config(spec, {"batch_wait_timeout_s": -1})
    with pytest.raises(ValueError, match="user_config.typo"):
        batching.batching_from_user_config(spec, {"typo": 1})


class _Engine:
    """The engine interface, with nothing behind it."""

    def __init__(self):
        self.applied = []

    def submit(self, requests):
        return []

    def apply(self, batching):
        self.applied.append(batching)

    def stats(self):
        return {"steps": 0}

    def close(self):
        pass


def test_an_invalid_live_user_config_keeps_the_replica_serving_with_its_settings(monkeypatch):
    import deployments.batched as batched
    from deployments.engines.base import Engine
    from deployments.llm import LLMDeployment

    from ray.serve import batching

    monkeypatch.setattr(batched, "replica_max_ongoing_requests", lambda: 8)
    # Outside a replica @serve.batch cannot look up max_ongoing_requests for its size warning.
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    spec = ChatModelSpec(id="m", source="unused", batching={"max_batch_size": 4})
    engine = _Engine()
    assert isinstance(engine, Engine)
    deployment = LLMDeployment.func_or_class(spec, engine_factory=lambda s: engine)
    deployment.reconfigure({"max_batch_size": 6, "max_running_rows": 12})
    assert deployment.batching.max_batch_size == 6 and engine.applied[-1].max_running_rows == 12
    for bad in ({"max_batch_size": 100}, {"max_batch_size": "x"}, {"nonsense": 1}):
        deployment.reconfigure(bad)  # must not raise: Ray would stop the replica
        assert deployment.batching.max_batch_size == 6  # the previous settings stay in force
        assert "user_config" in deployment.stats()["config_error"]
    deployment.reconfigure({"max_batch_size": 2})
    assert deployment.batching.max_batch_size == 2 and deployment.stats()["config_error"] is None
