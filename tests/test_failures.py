"""A deterministic data or config error ends a run at once: no `max_failures` retry is spent on it."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError
from ray.train import FailureConfig, RunConfig, WorkerGroupError
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from raymtl.config import Experiment, TaskSpec, TrainingSpec
from raymtl.data.transforms import BadImageError
from raymtl.errors import ConfigError, DataError
from raymtl.train.failures import PermanentErrorPolicy, Trainer, is_permanent
from raymtl.train.in_process import Retention, fit_in_process
from raymtl.train.precision import choose

BAD = BadImageError("task 'color': cannot read image 'a.png' in column 'image': OSError: truncated")


def test_a_bad_image_under_rays_wrappers_is_a_data_error():
    wrapped = RayTaskError("decode", "traceback", BAD).as_instanceof_cause()
    assert is_permanent(BAD) and is_permanent(wrapped)
    assert is_permanent(WorkerGroupError("rank 0 failed", {0: BAD, 1: RuntimeError("collective aborted")}))
    assert not is_permanent(RuntimeError("out of memory"))


def test_ray_trains_policy_raises_a_data_or_config_error_at_once_and_retries_the_rest():
    policy = PermanentErrorPolicy(FailureConfig(max_failures=-1))
    collateral = {0: RuntimeError("collective aborted"), 1: DataError("12 of 100 rows unreadable")}
    assert policy.make_decision(WorkerGroupError("failed", collateral)) is FailureDecision.RAISE
    # What only a worker can find (its own GPU) is as wrong at every attempt: -1 retried it for ever.
    try:
        choose("bf16", True, cuda=True, bf16_supported=False)
    except ConfigError as error:
        assert policy.make_decision(WorkerGroupError("failed", {0: error})) is FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("failed", {0: RuntimeError("node lost")})) is FailureDecision.RETRY


def test_the_trainer_hands_its_controller_the_policy(monkeypatch):
    from ray.train.torch import TorchTrainer

    seen = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kw: seen.update(kw))
    trainer = Trainer(lambda config: None, run_config=RunConfig(failure_config=FailureConfig(max_failures=2)))
    trainer._initialize_and_run_controller(failure_policy=None, other=1)
    assert isinstance(seen["failure_policy"], PermanentErrorPolicy) and seen["other"] == 1
    assert seen["failure_policy"].failure_config.max_failures == 2


@pytest.mark.parametrize("error, attempts", [(BAD, 1), (ConfigError("training.precision: bf16 ..."), 1),
                                             (RuntimeError("flaky"), 3)])
def test_a_run_in_this_process_retries_anything_but_a_data_or_config_error(monkeypatch, tmp_path, error, attempts):
    calls = []

    def loop(config):
        calls.append(config.get("resume_from"))
        raise error

    monkeypatch.setattr("raymtl.train.trainer.train_loop_per_worker", loop)
    exp = Experiment(name="r", tasks=[TaskSpec("color", train="x.parquet", image_column="image")],
                     storage_path=str(tmp_path), training=TrainingSpec(max_failures=2))
    with pytest.raises(WorkerGroupError) as raised:
        fit_in_process(exp, {"run_dir": str(tmp_path / "r")}, Retention(1, None, "min"))
    assert len(calls) == attempts
    assert is_permanent(raised.value) is isinstance(error, ConfigError)
