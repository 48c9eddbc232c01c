"""Exact continuation at another world size (plain numpy and torch): the rest of an epoch re-planned
reads every row once, in each task's order; the LR is a function of global samples."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch

from raymtl.config import TrainingSpec
from raymtl.data.plan import epoch_plan, global_order, global_steps, rank_steps, rechunk
from raymtl.data.schedule import TaskSchedule

N = {"color": 64, "style": 48}
B = 4


def schedule_for(world: int, sampler: str = "shuffled") -> list[str]:
    return TaskSchedule({t: (n // world) // B for t, n in N.items()}, seed=3, epoch=0, mode=sampler).steps()


def read(worlds: list[list[int]], sampler: str = "shuffled") -> list[tuple[str, list[int]]]:
    """Every step of an epoch resized at `worlds`: (task, the rows all ranks read), in order."""
    steps = epoch_plan(schedule_for(worlds[0][0], sampler), N, worlds)
    ends = [w[2] for w in worlds[1:]] + [len(steps)]
    out = []
    for (world, _, start), end in zip(worlds, ends):
        per_rank = [rank_steps(steps[start:end], N, seed=3, epoch=0, rank=r, world=world) for r in range(world)]
        for i, s in enumerate(steps[start:end]):
            out.append((s.task, sorted(int(x) for rank in per_rank for x in rank[i].rows)))
    return out


def test_the_first_steps_of_all_ranks_are_the_head_of_each_task_order():
    """All ranks' first k steps of a task are its order's first k * B * W rows: consumed is a prefix."""
    steps = global_steps(schedule_for(2), N, 2 * B)
    per_rank = [rank_steps(steps, N, seed=3, epoch=0, rank=r, world=2) for r in range(2)]
    order = global_order(N["color"], 3, 0, "color", 0)
    for k in range(1, 9):
        mine = [np.concatenate([s.rows for s in rank if s.task == "color"][:k]) for rank in per_rank]
        np.testing.assert_array_equal(np.sort(np.concatenate(mine)), np.sort(order[: k * B * 2]))


@pytest.mark.parametrize("worlds", [[[2, 2 * B, 0], [1, B, 5], [2, 2 * B, 12]], [[2, 2 * B, 0], [3, 3 * B, 4]], [[1, B, 0], [2, 2 * B, 3]]])
def test_a_resized_epoch_reads_every_row_exactly_once_in_each_task_order(worlds):
    steps = read(worlds)
    for task, n in N.items():
        rows = [r for t, batch in steps if t == task for r in batch]
        assert Counter(rows) == Counter(range(n))  # none twice, none skipped
        order = global_order(n, 3, 0, task, 0).tolist()
        seen = 0
        for t, batch in steps:  # each step reads the next slice of the task's order
            if t == task:
                assert batch == sorted(order[seen : seen + len(batch)])
                seen += len(batch)


def test_halving_the_world_keeps_the_schedule_of_global_samples():
    """W = 2 -> 1 at step 5: each later step of 8 rows becomes two consecutive steps of 4, same rows."""
    whole, resized = read([[2, 2 * B, 0]]), read([[2, 2 * B, 0], [1, B, 5]])
    assert resized[:5] == whole[:5]
    halves = [(t, sorted(a + b)) for (t, a), (u, b) in zip(resized[5::2], resized[6::2]) if t == u]
    assert halves == whole[5:]


def test_sampling_schedules_keep_passes_apart_when_resized():
    steps = epoch_plan(schedule_for(2, "uniform"), N, [[2, 2 * B, 0], [1, B, 7]])
    assert {s.size for s in steps[:7]} == {8} and {s.size for s in steps[7:]} == {4}
    for s in steps:
        assert 0 <= s.start < s.stop <= N[s.task]
    passes = Counter((s.task, s.epoch_pass) for s in steps)
    assert max(p for _, p in passes) >= 1  # the over-drawn task started a new pass, within its own rows


def test_rechunk_at_the_same_size_is_the_identity_and_a_short_tail_gives_a_rank_nothing():
    steps = global_steps(schedule_for(2), N, 2 * B)
    assert rechunk(steps[3:], 2 * B) == steps[3:]
    tail = rechunk(global_steps(["color"] * 7, {"color": 60}, 8)[6:], 12)  # 8 rows left: one short step
    assert [(s.start, s.stop) for s in tail] == [(48, 56)]
    assert rank_steps(rechunk(tail, 7), {"color": 60}, seed=0, epoch=0, rank=6, world=7)[1].rows.size == 0


def lr_trace(worlds: list[tuple[int, int]], total_steps: int = 12, warmup: int = 3) -> dict[int, float]:
    """{global samples before a step: the LR of that step} of a run on `worlds` [(world, steps), ...],
    its optimizer and schedule saved and loaded into fresh ones at each change, built as the loop
    builds a resumed stage's: `total_steps` of the step size the stage started on (`stage_step`)."""
    from raymtl.train.optim import build_lr_schedule, stage_step

    training = TrainingSpec(lr_schedule="warmup_cosine", warmup_steps=warmup, batch_size=B)
    state, samples, out = None, 0, {}
    for world, steps in worlds:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        step = stage_step(state[1]) if state else B * world
        schedule = build_lr_schedule(opt, training, total_steps=total_steps, step_samples=step)
        if state is not None:
            opt.load_state_dict(state[0])
            schedule.load_state_dict(state[1])
        for _ in range(steps):
            out[samples] = opt.param_groups[0]["lr"]
            opt.step()
            schedule.after_step(B * world)
            samples += B * world
        state = opt.state_dict(), schedule.state_dict()
    return out


def test_the_learning_rate_is_a_function_of_global_samples_across_resizes():
    whole = lr_trace([(2, 12)])
    resized = lr_trace([(2, 5), (1, 6), (2, 4)])
    assert set(whole) <= set(resized)
    assert all(resized[s] == lr for s, lr in whole.items())  # bit for bit at every shared sample count
    assert resized[5 * 8 + 4] not in (resized[5 * 8], resized[6 * 8])  # the W=1 step in between has its own


def test_a_global_batch_keeps_the_steps_across_a_resize_and_splits_them_among_the_ranks():
    from raymtl.config import ConfigError, Experiment, TaskSpec, global_batch

    assert global_batch(TrainingSpec(batch_size=16), 3) == 48
    assert global_batch(TrainingSpec(batch_size=16, batch_scope="global"), 3) == 16
    steps = epoch_plan(schedule_for(2), N, [[2, 8, 0], [3, 8, 5]])  # the step stays 8 rows on 3 ranks
    assert steps == global_steps(schedule_for(2), N, 8)
    sizes = [len(s.rows) for r in range(3) for s in rank_steps(steps[5:6], N, seed=3, epoch=0, rank=r, world=3)]
    assert sizes == [3, 3, 2]
    with pytest.raises(ConfigError, match="a global batch of 2 leaves some of 4 workers no row"):
        Experiment(name="e", tasks=[TaskSpec(name="t", train="t.parquet", image_column="image")],
                   training=TrainingSpec(batch_size=2, batch_scope="global", num_workers=[1, 4])).validate()
    with pytest.raises(ConfigError, match=r"expected N >= 1 or \[min, max\] with 1 <= min <= max, got \[3, 2\]"):
        Experiment(name="e", tasks=[TaskSpec(name="t", train="t.parquet", image_column="image")], training=TrainingSpec(num_workers=[3, 2])).validate()


def test_a_rerun_with_more_epochs_goes_on_along_the_longer_cosine_not_the_finished_one():
    """A warmup-cosine schedule saved at its end (lr 0) and loaded into the schedule of a longer
    config gives the longer schedule's lr at the saved sample count, saying so; an unchanged one loads as saved."""
    from raymtl.train.optim import build_lr_schedule

    training = TrainingSpec(lr_schedule="warmup_cosine", warmup_steps=2, batch_size=B)

    def run(total_steps: int, steps: int, state: tuple | None = None) -> tuple[float, str | None, tuple]:
        """The lr after `steps` steps of a schedule over `total_steps` resumed from `state`, what
        loading it said, and the state to save."""
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = build_lr_schedule(opt, training, total_steps=total_steps, step_samples=B)
        change = None
        if state is not None:
            opt.load_state_dict(state[0])
            change = schedule.load_state_dict(state[1])
        for _ in range(steps):
            opt.step()
            schedule.after_step(B)
        return opt.param_groups[0]["lr"], change, copy.deepcopy((opt.state_dict(), schedule.state_dict()))

    lr, _, saved = run(10, 10)
    assert lr == 0.0
    lr, change, _ = run(20, 0, saved)
    assert 0 < lr == run(20, 10)[0]
    assert change == "the LR schedule changed with the config (warmup 8 -> 8, total 40 -> 80 global samples): " \
                     "it goes on along the new one from sample 40"
    assert run(20, 5, saved)[0] == run(20, 15)[0]
    assert run(10, 0, saved)[:2] == (0.0, None)  # unchanged: as saved
