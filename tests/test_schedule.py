from collections import Counter

import numpy as np
import pytest

from raymtl.config import ConfigError
from raymtl.data.schedule import TaskSchedule

BATCHES = {"color": 30, "pattern": 12, "season": 3}


def test_shuffled_runs_every_batch_of_every_task_exactly_once():
    steps = TaskSchedule(BATCHES, seed=0, epoch=0).steps()
    assert Counter(steps) == BATCHES
    assert steps != sorted(steps)  # interleaved, not task after task


def test_same_seed_and_epoch_give_identical_schedules_whatever_the_dict_order():
    a = TaskSchedule(BATCHES, seed=7, epoch=2).steps()
    b = TaskSchedule(dict(reversed(list(BATCHES.items()))), seed=7, epoch=2).steps()
    assert a == b


def test_epochs_and_seeds_change_the_order():
    base = TaskSchedule(BATCHES, seed=7, epoch=0).steps()
    assert TaskSchedule(BATCHES, seed=7, epoch=1).steps() != base
    assert TaskSchedule(BATCHES, seed=8, epoch=0).steps() != base


@pytest.mark.parametrize("mode", ["shuffled", "proportional", "uniform", "temperature"])
def test_resume_at_step_k_is_the_tail_of_the_full_schedule(mode):
    sched = TaskSchedule(BATCHES, seed=3, epoch=1, mode=mode)
    full = sched.steps()
    assert len(full) == sum(BATCHES.values())
    for k in (0, 1, 17, len(full) - 1, len(full)):
        assert sched.steps(start=k) == full[k:]


def test_temperature_one_is_proportional_and_large_temperature_tends_to_uniform():
    prop = TaskSchedule(BATCHES, 0, 0, mode="proportional").probabilities()
    t1 = TaskSchedule(BATCHES, 0, 0, mode="temperature", temperature=1.0).probabilities()
    np.testing.assert_allclose(t1, prop)
    np.testing.assert_allclose(prop, np.array([30, 12, 3]) / 45)  # tasks sorted: color, pattern, season
    hot = TaskSchedule(BATCHES, 0, 0, mode="temperature", temperature=1e6).probabilities()
    np.testing.assert_allclose(hot, np.full(3, 1 / 3), atol=1e-5)
    t2 = TaskSchedule(BATCHES, 0, 0, mode="temperature", temperature=2.0).probabilities()
    assert prop.min() < t2.min() < 1 / 3  # smaller tasks are up-weighted, monotonically in T


def test_sampling_modes_follow_their_probabilities():
    sched = TaskSchedule({"a": 900, "b": 100}, seed=0, epoch=0, mode="uniform")
    share = Counter(sched.steps())["b"] / len(sched)
    assert abs(share - 0.5) < 0.05
    sched = TaskSchedule({"a": 900, "b": 100}, seed=0, epoch=0, mode="proportional")
    assert abs(Counter(sched.steps())["b"] / len(sched) - 0.1) < 0.03


def test_bad_schedules_name_the_fault():
    with pytest.raises(ConfigError, match="season"):
        TaskSchedule({"color": 3, "season": 0}, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="tempreature|unknown sampler"):
        TaskSchedule(BATCHES, seed=0, epoch=0, mode="tempreature")
