"""App config: validated at build time, errors name the field."""

import pytest
from pydantic import ValidationError

from app.config import AppArgs, ModelSpec


def test_defaults_and_deployment_name():
    args = AppArgs.model_validate({"models": [{"id": "Qwen/Qwen2.5-0.5B-Instruct",
                                               "source": "Qwen/Qwen2.5-0.5B-Instruct"}]})
    spec = args.models[0]
    assert spec.task == "chat" and spec.dtype == "auto"
    assert spec.deployment_name == "Qwen-Qwen2.5-0.5B-Instruct"
    assert args.ingress.max_ongoing_requests >= 256


@pytest.mark.parametrize("bad,field", [
    ({"models": []}, "models"),
    ({"models": [{"id": "a", "source": "demo:chat", "dtype": "int3"}]}, "dtype"),
    ({"models": [{"id": "a", "source": "demo:chat", "batching": {"max_batch_size": 0}}]}, "max_batch_size"),
    ({"models": [{"id": "a", "source": "demo:chat", "typo_field": 1}]}, "typo_field"),
    ({"models": [{"id": "a", "source": "demo:chat"}, {"id": "a", "source": "demo:chat"}]}, "duplicate"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(bad)
    assert field in str(info.value)


def test_builder_sizes_max_ongoing_with_the_batch():
    from app.builder import build_app, model_deployment

    spec = ModelSpec(id="m", source="demo:chat", batching={"max_batch_size": 32, "max_running_rows": 16})
    app = model_deployment(spec)
    options = app._bound_deployment._deployment_config
    assert options.max_ongoing_requests >= 32
    assert options.user_config["max_batch_size"] == 32
    assert build_app({"models": [{"id": "m", "source": "demo:chat"}]}) is not None


def test_user_config_is_validated_against_max_ongoing(monkeypatch):
    import deployments.batching as batching

    spec = ModelSpec(id="m", source="demo:chat", batching={"max_batch_size": 4, "max_running_rows": 16})
    monkeypatch.setattr(batching, "replica_max_ongoing_requests", lambda: 8)
    merged = batching.batching_from_user_config(spec, {"max_batch_size": 8})
    assert merged.max_batch_size == 8 and merged.max_running_rows == 16  # partial update keeps the rest
    with pytest.raises(ValueError, match=r"max_ongoing_requests \(8\) must be >= max_batch_size \(9\)"):
        batching.batching_from_user_config(spec, {"max_batch_size": 9})
    with pytest.raises(ValidationError, match="batch_wait_timeout_s"):
        batching.batching_from_user_config(spec, {"batch_wait_timeout_s": -1})
