"""Real Ray Train runs on a tiny synthetic catalogue (the session's shared Ray cluster).

Few runs, small data: learning with 2 workers (gloo), and exact resume after an injected worker
crash (recovered in-run by Ray Train) and after an interrupted run re-run under the same name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from raymtl.config import Experiment, StageSpec, TaskSpec, load_experiment
from raymtl.data.synthetic import make_catalogue, write_demo_config
from raymtl.data.device_inputs import DeviceInputs
from raymtl.data.transforms import Preprocessor
from raymtl.models.artifact import load
from raymtl.train.faults import CRASH_ENV
from raymtl.train.trainer import fit

pytestmark = pytest.mark.timeout(900)

CHANCE = {"color": 1 / 6, "pattern": 1 / 4, "season": 1 / 4}


def catalogue(root, sizes):
    cat = make_catalogue(root / "data", seed=0, image_size=32, sizes=sizes)
    return write_demo_config(
        root / "data",
        cat,
        storage_path=str(root / "runs"),
        data={"image_size": 32, "views": [{"name": "full"}, {"name": "crop", "crop": 0.6}]},
        model={"hidden_dim": 64},
        training={"batch_size": 16, "lr_schedule": "none", "cpus_per_worker": 1, "collective_timeout_s": 120},
    )


@pytest.fixture(scope="module")
def catalogue_config(tmp_path_factory):
    """Small: two tasks, 8 batches each per epoch (one worker)."""
    return catalogue(tmp_path_factory.mktemp("small"), {"color": 160, "style": 160})


def experiment(config, name: str, **training):
    exp = load_experiment(config)
    return dataclasses.replace(exp, name=name, training=dataclasses.replace(exp.training, **training))


@contextlib.contextmanager
def crash_at(step: int) -> Iterator[None]:
    """Rank 0's worker exits once at `step` in runs started inside `with crash_at(step):`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CRASH_ENV, str(step))
        yield


def without_timings(history: list[dict]) -> list[dict]:
    """Epoch rows less the `perf/*` timings, which no two runs share."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in history]


def weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load(checkpoint).model.state_dict()


@pytest.fixture(scope="module")
def learned(ray_cluster, tmp_path_factory):
    """A two-group image+text ensemble (visual: color; words: season) trained for 4 epochs.

    The multilabel `style` task is left out here: sharing the small text encoder with `season`, it
    stays at its prior within a test's budget of steps (trained alone it learns in ~40 steps).
    """
    config = catalogue(tmp_path_factory.mktemp("learn"), {"color": 320, "season": 320, "pattern": 320})
    exp = experiment(config, "learn", epochs=4, lr=3e-3)
    exp = dataclasses.replace(
        exp,
        tasks=[t for t in exp.tasks if t.name != "pattern"],  # added later, to the trained model
        model=dataclasses.replace(exp.model, groups={"visual": ["color"], "words": ["season"]}),
    )
    return config, exp, fit(exp)


def val_accuracy(saved, task: TaskSpec) -> float:
    prep = Preprocessor(task, saved.infos[task.name], saved.data)
    batch = DeviceInputs(saved.data, "cpu")(prep(pd.read_parquet(task.validation)))
    with torch.no_grad():
        return (saved.model(batch, task.name).argmax(1) == batch["label"]).float().mean().item()


def test_two_group_ensemble_loss_falls_and_every_task_beats_chance(learned):
    _, exp, result = learned
    first, last = result.history[0], result.history[-1]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert last["val/mean_loss"] < first["val/mean_loss"]
    for task, chance in CHANCE.items():
        if task in exp.task_names:
            assert last[f"val/{task}/accuracy"] > chance + 0.25, (task, last)
    saved = load(result.checkpoint)
    assert saved.groups == {"visual": ["color"], "words": ["season"]}
    assert val_accuracy(saved, exp.task("color")) == pytest.approx(last["val/color/accuracy"])


def test_adding_a_task_keeps_the_old_tasks_working(learned):
    """A new group trains its own backbone; the text encoder all groups share is frozen meanwhile.

    So the old tasks' whole path (their backbone, the text encoder, their fusion layer and head) is
    untouched: their validation accuracy is unchanged (tolerance 0), while the new task learns: its
    backbone starts from scratch, so it gets 3 epochs (48 steps; one epoch is too few to be sure).
    Without the freeze, `pattern` steps move the shared text encoder and `season` (text) drops.
    """
    config, exp, result = learned
    before = load(result.checkpoint)
    pattern = next(t for t in load_experiment(config).tasks if t.name == "pattern")
    grown = dataclasses.replace(
        exp,
        name="add-pattern",
        tasks=[pattern],
        model=dataclasses.replace(exp.model, base=result.checkpoint, groups={"shapes": ["pattern"]}),
        training=dataclasses.replace(exp.training, epochs=3, stages=[StageSpec(epochs=3, freeze=["text"])]),
    )
    added = fit(grown)
    after = load(added.checkpoint)
    assert set(after.tasks) == {"color", "season", "pattern"}
    assert after.groups == {"visual": ["color"], "words": ["season"], "shapes": ["pattern"]}
    assert after.infos["color"].labels == before.infos["color"].labels
    for name in ("color", "season"):
        assert val_accuracy(after, exp.task(name)) == val_accuracy(before, exp.task(name))
    assert added.history[-1]["val/pattern/accuracy"] > CHANCE["pattern"]


def test_two_workers_evaluate_the_validation_set_as_one_process_would(ray_cluster, tmp_path):
    """gloo DDP, two shards per task, collective timeout 120 s: a deadlock fails the test.

    Each rank evaluates its shard and the metric states are summed: the reported accuracy is the
    saved model's on the whole validation set, computed here in one process. 33 validation rows a
    task: one rank has a row more than the other, none is left out.
    """
    config = catalogue(tmp_path, {"color": 165, "style": 163})  # train 132 / 130, validation 33 / 33
    result = fit(experiment(config, "two-workers", num_workers=2, epochs=1, affinity_every_steps=2))
    (row,) = result.history
    assert row["global_step"] == (132 // 2) // 16 + (130 // 2) // 16  # per task: (rows // workers) // batch
    color = load_experiment(config).task("color")
    assert row["val/color/accuracy"] == pytest.approx(val_accuracy(load(result.checkpoint), color))
    assert {"val/color/macro_f1", "val/style/micro_f1", "val/style/exact_match"} <= row.keys()
    # inter-task affinity measured on both ranks, averaged, saved with its heatmap
    affinity = json.loads((Path(result.run_dir) / "affinity.json").read_text())
    assert affinity["tasks"] == ["color", "style"] and affinity["count"] >= 1
    assert all(math.isfinite(v) for row in affinity["mean"] for v in row)
    assert (Path(result.run_dir) / "affinity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, catalogue_config):
    exp = experiment(catalogue_config, "straight", epochs=2, deterministic=True, checkpoint_every_steps=6)
    return fit(exp)


@pytest.mark.parametrize("in_process", ["always", "never"])
def test_worker_crash_is_recovered_and_resumes_exactly(catalogue_config, uninterrupted, in_process):
    """On Ray Train's workers the worker process dies; in the driver's process the attempt raises.
    Either way the run resumes from its step-12 checkpoint and ends where an uninterrupted run does."""
    exp = experiment(catalogue_config, f"crash-{in_process}", epochs=2, deterministic=True, checkpoint_every_steps=6,
                     max_failures=1, in_process=in_process)
    with crash_at(13):
        result = fit(exp)
    assert without_timings(result.history) == without_timings(uninterrupted.history)  # same tasks and data
    expected = weights(uninterrupted.checkpoint)
    for key, value in weights(result.checkpoint).items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("first, then", [("always", "never"), ("never", "always")])
def test_interrupted_run_resumes_under_the_same_name(catalogue_config, uninterrupted, first, then):
    """Resumed from the run folder's newest checkpoint, on Ray Train's workers or in the driver's
    process, whichever the interrupted run used."""
    def run(in_process: str) -> Experiment:
        return experiment(catalogue_config, f"interrupted-{first}", epochs=2, deterministic=True,
                          checkpoint_every_steps=6, max_failures=0, in_process=in_process)

    with crash_at(25):
        failed = fit(run(first), raise_on_error=False)
    assert failed.error is not None
    assert len(failed.history) <= 1
    resumed = fit(run(then))  # same name: picks up the step-24 checkpoint
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    expected = weights(uninterrupted.checkpoint)
    for key, value in weights(resumed.checkpoint).items():
        assert torch.equal(value, expected[key]), key
