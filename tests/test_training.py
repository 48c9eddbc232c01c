"""Real Ray Train runs on a tiny synthetic catalogue (the session's shared Ray cluster).

Few runs, small data: learning with 2 workers (gloo), and exact resume after an injected worker
crash (recovered in-run by Ray Train) and after an interrupted run re-run under the same name.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raymtl.config import load_experiment
from raymtl.data.synthetic import make_catalogue, write_demo_config
from raymtl.models.artifact import load
from raymtl.train.trainer import fit

pytestmark = pytest.mark.timeout(900)

CHANCE = {"color": 1 / 6, "pattern": 1 / 4, "season": 1 / 4}


@pytest.fixture(scope="module")
def catalogue_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    catalogue = make_catalogue(root / "data", seed=0, image_size=32,
                               sizes={"color": 320, "season": 240, "style": 240})
    return write_demo_config(
        root / "data",
        catalogue,
        storage_path=str(root / "runs"),
        data={"image_size": 32, "views": [{"name": "full"}, {"name": "crop", "crop": 0.6}]},
        model={"hidden_dim": 64},
        training={"batch_size": 16, "cpus_per_worker": 1, "collective_timeout_s": 120},
    )


def experiment(config, name: str, **training):
    exp = load_experiment(config)
    return dataclasses.replace(exp, name=name, training=dataclasses.replace(exp.training, **training))


def weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load(checkpoint).model.state_dict()


def test_two_workers_learn_every_task_without_hanging(ray_cluster, catalogue_config):
    exp = experiment(catalogue_config, "two-workers", num_workers=2, epochs=4, lr=2e-3)
    result = fit(exp)
    first, last = result.history[0], result.history[-1]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert last["val/mean_loss"] < first["val/mean_loss"]
    for task, chance in CHANCE.items():
        if task in exp.task_names:
            assert last[f"val/{task}/accuracy"] > chance + 0.25, (task, last)
    assert last["val/style/micro_f1"] > 0.6
    assert load(result.checkpoint).tasks == exp.task_names


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, catalogue_config):
    exp = experiment(catalogue_config, "straight", epochs=2, deterministic=True, checkpoint_every_steps=10)
    return fit(exp)


def test_worker_crash_is_recovered_and_resumes_exactly(catalogue_config, uninterrupted):
    exp = experiment(catalogue_config, "crash", epochs=2, deterministic=True, checkpoint_every_steps=10,
                     debug_crash_at_step=27, max_failures=1)
    result = fit(exp)
    assert result.history == uninterrupted.history  # the identical task sequence and data
    expected = weights(uninterrupted.checkpoint)
    for key, value in weights(result.checkpoint).items():
        assert torch.equal(value, expected[key]), key


def test_interrupted_run_resumes_under_the_same_name(catalogue_config, uninterrupted):
    exp = experiment(catalogue_config, "interrupted", epochs=2, deterministic=True, checkpoint_every_steps=10,
                     debug_crash_at_step=23, max_failures=0)
    failed = fit(exp, raise_on_error=False)
    assert failed.error is not None
    assert len(failed.history) <= 1
    resumed = fit(exp)  # same name: picks up the step-20 checkpoint
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    expected = weights(uninterrupted.checkpoint)
    for key, value in weights(resumed.checkpoint).items():
        assert torch.equal(value, expected[key]), key
