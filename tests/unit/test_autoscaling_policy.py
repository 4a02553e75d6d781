"""The engine-load autoscaling policy (deployments/autoscaling.py) on hand-made Serve contexts, and the
replica hook that feeds it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from deployments.autoscaling import EngineLoadPolicy, desired_replicas, EngineLoadArgs


@dataclass
class Point:  # the shape of Serve's TimeStampedValue
    timestamp: float
    value: float


@dataclass
class Ctx:  # the fields of Serve's AutoscalingContext the policy reads
    current_num_replicas: int
    target_num_replicas: int
    raw_metrics: dict
    aggregated_metrics: dict
    total_queued_requests: float = 0.0


def series(*values: float) -> list[Point]:
    return [Point(float(i), v) for i, v in enumerate(values)]


POLICY = EngineLoadPolicy(target_rows=8, max_waiting_prefill_tokens=100)


def test_rows_over_the_target_ask_for_more_replicas_at_once():
    # One replica whose latest report is 20 running + 4 waiting rows: 24 / 8 = 3 replicas, although the
    # window average (what the default policy would see) is still low.
    ctx = Ctx(1, 1, raw_metrics={"running_rows": {"r1": series(0, 2, 20)}, "waiting_rows": {"r1": series(0, 0, 4)}},
              aggregated_metrics={"running_rows": {"r1": 7.0}, "waiting_rows": {"r1": 1.0}})
    want, state = POLICY(ctx)
    assert want == 3 and state["engine_load_want"] == 3


def test_scaling_down_waits_for_the_window_average():
    # Latest reports are idle but the look-back average still holds 12 rows over 2 replicas: keep 2.
    ctx = Ctx(2, 2, raw_metrics={"running_rows": {"a": series(8, 0), "b": series(8, 0)}},
              aggregated_metrics={"running_rows": {"a": 6.0, "b": 6.0}})
    assert POLICY(ctx)[0] == 2
    idle = Ctx(2, 2, raw_metrics={"running_rows": {"a": series(0), "b": series(0)}},
               aggregated_metrics={"running_rows": {"a": 0.5, "b": 0.0}})
    assert POLICY(idle)[0] == 1


def test_prompts_waiting_beyond_the_bound_add_a_replica_whatever_the_rows():
    ctx = Ctx(1, 1, raw_metrics={"running_rows": {"a": series(2)}, "waiting_prefill_tokens": {"a": series(500)}},
              aggregated_metrics={"running_rows": {"a": 2.0}})
    assert POLICY(ctx)[0] == 2


def test_requests_queued_at_callers_count_as_rows():
    args = EngineLoadArgs(target_rows=4)
    assert desired_replicas(1, {"running_rows": {"a": 4}}, {}, queued=4, args=args) == 2


def test_no_reports_yet_holds_the_current_target():
    assert POLICY(Ctx(1, 1, raw_metrics={}, aggregated_metrics={}))[0] == 1


def test_policy_kwargs_are_validated():
    with pytest.raises(ValidationError):
        EngineLoadPolicy(target_rows=0)
    with pytest.raises(ValidationError):
        EngineLoadPolicy(target_rows=8, unknown=1)


def test_ray_serve_accepts_the_policy_by_import_path():
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(min_replicas=1, max_replicas=2, policy={
        "policy_function": "deployments.autoscaling:EngineLoadPolicy", "policy_kwargs": {"target_rows": 8}})
    policy_cls = config.policy.get_policy()
    assert policy_cls(**config.policy.policy_kwargs).args.target_rows == 8


def test_the_replica_hook_reports_the_engine_counters_as_numbers():
    from deployments.batched import BatchedDeployment

    class Engine:
        def stats(self):
            return {"running_rows": 3, "waiting_rows": 2, "waiting_prefill_tokens": 40, "flag": True,
                    "name": "x"}

    replica = BatchedDeployment.__new__(BatchedDeployment)  # the hook needs only the engine
    replica.engine = Engine()
    assert replica.record_autoscaling_stats() == {"running_rows": 3.0, "waiting_rows": 2.0,
                                                  "waiting_prefill_tokens": 40.0}
