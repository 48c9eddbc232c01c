"""Ray Train runs with 2 workers: collectives device-correct, exact and elastic resume, refused resume.

A two-group model (one backbone per task, the text encoder shared) on a tiny catalogue (32 px):
per rank and task (128 rows // 2 workers) // 16 = 4 batches, 8 steps per epoch with 2 workers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from raymtl.config import ConfigError
from raymtl.train.faults import CRASH_MARKER
from raymtl.train.report import read_history, read_rows
from raymtl.train.trainer import fit, make_trainer, prepare
from rows import kept_steps, logging_rows, lr_at, rows_read
from test_training import catalogue, crash_at, experiment, weights, without_timings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
GROUPS = {"colors": ["color"], "styles": ["style"]}


def two_groups(config, name: str, **training):
    exp = experiment(config, name, num_workers=2, deterministic=True, checkpoint_every_steps=3,
                     lr_schedule="warmup_cosine", warmup_steps=3, **training)
    return dataclasses.replace(exp, model=dataclasses.replace(exp.model, groups=GROUPS))


def recording_collectives(loop, out_dir: str):
    """`loop`, with every torch.distributed collective recorded: its tensors' devices and whether it
    was issued through `raymtl.train.collectives.collective` (the helper that places tensors)."""

    def run(config):
        import json
        import sys

        import ray.train
        import torch
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        from raymtl.train import collectives

        calls = []

        def via_helper() -> bool:
            frame = sys._getframe(2)
            while frame is not None:
                if frame.f_code is collectives.collective.__code__:
                    return True
                frame = frame.f_back
            return False

        def wrap(name, real):
            def call(*args, **kwargs):
                values = [*args, *kwargs.values()]
                tensors = [v for v in values if isinstance(v, torch.Tensor)]
                tensors += [t for v in values if isinstance(v, (list, tuple)) for t in v if isinstance(t, torch.Tensor)]
                calls.append({"op": name, "via_helper": via_helper(), "devices": [str(t.device) for t in tensors],
                              "required": str(collectives.group_device())})
                return real(*args, **kwargs)

            return call

        for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                     "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                     "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"):
            hooked = wrap(name, getattr(c10d, name))
            setattr(c10d, name, hooked)
            setattr(dist, name, hooked)
        try:
            loop(config)
        finally:
            rank = ray.train.get_context().get_world_rank()
            with open(f"{out_dir}/rank{rank}.json", "w") as f:
                json.dump(calls, f)

    return run


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return catalogue(tmp_path_factory.mktemp("dist"), {"color": 160, "style": 160})


@pytest.fixture(scope="module")
def straight(ray_cluster, config, tmp_path_factory):
    """Uninterrupted 2 epochs, affinity measured, with every collective recorded."""
    out = tmp_path_factory.mktemp("calls")
    exp, infos = prepare(two_groups(config, "straight2", epochs=2, affinity_every_steps=4))
    with logging_rows(tmp_path_factory.mktemp("straight_rows")) as rows:
        trainer = make_trainer(exp, infos)  # its workers' runtime env carries the row log's folder
        trainer.train_loop_per_worker = recording_collectives(trainer.train_loop_per_worker, str(out))
        result = trainer.fit()
    calls = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return result, read_history(str(Path(exp.storage_path).expanduser() / exp.name)), calls, kept_steps(rows)


def test_every_collective_goes_through_the_helper_on_the_group_device(straight):
    """Gradient sync, buffer broadcast, metric states, affinity and RNG gather, on both ranks."""
    _, history, calls, _ = straight
    assert [row["epoch"] for row in history] == [1, 2]
    for rank_calls in calls:
        ops = {c["op"] for c in rank_calls}
        assert ops == {"all_reduce", "broadcast"}, ops  # no object collectives (they pickle through torch)
        # 16 steps of gradient sync at least, plus evaluation, affinity, RNG gathers
        assert sum(c["op"] == "all_reduce" for c in rank_calls) > 16
        bad = [c for c in rank_calls if not c["via_helper"] or any(d != c["required"] for d in c["devices"])]
        assert not bad, bad[:3]


@pytest.fixture(scope="module")
def crashed(ray_cluster, config, tmp_path_factory):
    """2 workers crash at step 11 (epoch 2, step 3), every step's rows logged; the run folder is
    copied under a second name at once, so that one crash is resumed twice: as it was (2 workers)
    and on 1 worker.

    Checkpoints at steps 3, 6, 8 (epoch 1's end) and 9; the crash may come before Ray Train has
    registered the step-9 one, so a resume starts from step 8 or 9.
    """
    exp = two_groups(config, "crashed", epochs=2, affinity_every_steps=4, max_failures=0)
    rows = tmp_path_factory.mktemp("crash_rows")
    with logging_rows(rows), crash_at(11):
        failed = fit(exp, raise_on_error=False)
    assert failed.error is not None and len(failed.history) == 1
    shutil.copytree(failed.run_dir, Path(failed.run_dir).with_name("shrink"))  # checkpoints are named relative to it
    return exp, failed, rows


def test_two_group_two_worker_run_resumes_exactly(crashed, straight):
    result, history, _, _ = straight
    exp, _, _ = crashed
    resumed = fit(exp)  # the step-9 checkpoint (epoch 2, step 1): same world size, exact position
    assert without_timings(resumed.history) == without_timings(history)
    expected = weights(result.checkpoint.path)
    for key, value in weights(resumed.checkpoint).items():
        assert torch.equal(value, expected[key]), key


def test_two_worker_crash_is_recovered_and_resumes_exactly(ray_cluster, config, straight):
    """Rank 0 dies at step 11 (epoch 2, step 3); Ray Train restarts both workers from the latest
    checkpoint (step 9) and the run ends as the uninterrupted one, bit for bit."""
    result, history, _, _ = straight
    exp = two_groups(config, "recovered2", epochs=2, affinity_every_steps=4, max_failures=1)
    with crash_at(11):
        recovered = fit(exp)
    assert (Path(recovered.run_dir) / CRASH_MARKER).is_file()  # it did crash
    assert without_timings(recovered.history) == without_timings(history)
    expected = weights(result.checkpoint.path)
    for key, value in weights(recovered.checkpoint).items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module")
def shrunk(crashed):
    """The crashed run's copy resumed with 1 worker, its steps' rows logged beside the crash's."""
    exp, failed, rows = crashed
    exp = dataclasses.replace(exp, name="shrink", training=dataclasses.replace(exp.training, num_workers=1))
    with logging_rows(rows):
        resumed = fit(exp)
    return exp, failed, resumed, kept_steps(rows)


def test_resume_with_fewer_workers_reads_the_rest_of_the_epoch_exactly_at_the_same_lr(shrunk, straight):
    _, failed, result, steps = shrunk
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[0] == failed.history[0]  # the 2-worker epoch is kept as it was
    assert failed.history[0]["global_step"] == 8
    # Epoch 2 continues where the checkpoint was: from its boundary (step 8: 16 steps of 1 worker),
    # or from its step 1 (9): the 7 steps of 2 x 16 rows left become 14 steps of 16.
    assert result.history[1]["global_step"] in (8 + 16, 9 + 14)
    resize = [row for row in read_rows(result.run_dir) if row.get("event") == "resize"]
    assert [(r["old_world"], r["world"]) for r in resize] == [(2, 1)] and resize[0]["global_step"] in (8, 9)
    # Every row of each task (128 training rows), once in each epoch, the resize's included.
    read = rows_read(steps)
    assert sorted(read) == [(e, t) for e in (0, 1) for t in ("color", "style")]
    assert all(counts == Counter(range(128)) for counts in read.values())
    assert any(step["world"] == 1 for step in steps if step["epoch"] == 1)
    # The learning rate is the uninterrupted 2-worker run's at every sample count both reach.
    ours, theirs = lr_at(steps), lr_at(straight[3])
    assert len(set(ours) & set(theirs)) >= 16
    assert all(ours[at] == theirs[at] for at in set(ours) & set(theirs))


def test_resume_with_changed_labels_is_refused_before_ray(shrunk):
    exp, _, _, _ = shrunk
    color = exp.task("color")
    labels = sorted(load_labels(exp, "color"), reverse=True)
    changed = dataclasses.replace(exp, tasks=[dataclasses.replace(color, labels=labels) if t is color else t for t in exp.tasks])
    with pytest.raises(ConfigError, match=r"cannot resume run 'shrink' from .*checkpoint_.*: labels of task 'color' changed"):
        prepare(changed)


def load_labels(exp, task: str) -> list[str]:
    _, infos = prepare(exp)
    return infos[task].labels
