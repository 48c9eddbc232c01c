"""The per-rank batch plan: equal disjoint shards, drop_last, passes, resume at any step (plain numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from raymtl.data.plan import global_order, global_steps, rank_rows, rank_steps, train_steps, val_steps
from raymtl.data.schedule import TaskSchedule

N = {"color": 70, "style": 41}


def plan(world: int, rank: int, *, epoch: int = 0, sampler: str = "shuffled", start: int = 0, batch: int = 8):
    batches = {t: (n // world) // batch for t, n in N.items()}
    schedule = TaskSchedule(batches, seed=3, epoch=epoch, mode=sampler).steps()
    return schedule, train_steps(schedule, N, batch, seed=3, epoch=epoch, rank=rank, world=world, start=start)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_read_disjoint_equal_shards_in_the_schedule_order(world):
    per_rank = [plan(world, r) for r in range(world)]
    schedule = per_rank[0][0]
    for _, steps in per_rank:
        assert [s.task for s in steps] == schedule  # the same task at every step on every rank
        assert all(len(s.rows) == 8 for s in steps)  # full batches only
    for task, n in N.items():
        rows = np.concatenate([s.rows for _, steps in per_rank for s in steps if s.task == task])
        assert len(rows) == len(set(rows.tolist())) == ((n // world) // 8) * 8 * world  # no row twice
        assert rows.min() >= 0 and rows.max() < n


def test_the_first_k_batches_of_all_ranks_are_the_head_of_the_global_order():
    """What makes a resume exact at any world size: consumed rows are a prefix of the epoch's order."""
    world, k = 2, 3
    order = global_order(N["color"], 3, 0, "color", 0)
    firsts = [[s.rows for s in plan(world, r)[1] if s.task == "color"][:k] for r in range(world)]
    consumed = np.sort(np.concatenate([b for rank in firsts for b in rank]))
    np.testing.assert_array_equal(consumed, np.sort(order[: k * 8 * world]))


def test_resuming_at_a_step_continues_the_same_plan():
    _, full = plan(2, 1)
    _, tail = plan(2, 1, start=5)
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        assert a.task == b.task and np.array_equal(a.rows, b.rows)


def test_epochs_reshuffle_and_sampling_starts_new_passes():
    (_, e0), (_, e1) = plan(1, 0, epoch=0), plan(1, 0, epoch=1)
    assert not np.array_equal(e0[0].rows, e1[0].rows) or e0[0].task != e1[0].task
    sizes = {"big": 200, "small": 24}
    schedule = TaskSchedule({t: n // 8 for t, n in sizes.items()}, seed=0, epoch=0, mode="uniform").steps()
    small = [s.rows for s in train_steps(schedule, sizes, 8, seed=0, epoch=0, rank=0, world=1) if s.task == "small"]
    assert len(small) > 3  # uniform sampling over-draws the small task: 3 batches a pass
    assert len(set(np.concatenate(small[:3]).tolist())) == 24  # within a pass no row repeats
    assert not np.array_equal(np.concatenate(small[:3]), np.concatenate(small[3:6]))  # the next pass is reshuffled


def test_unshuffled_plan_reads_rows_in_stored_order():
    steps = train_steps(["color", "color"], {"color": 32}, 8, seed=0, epoch=0, rank=1, world=2, shuffle=False)
    assert [s.rows.tolist() for s in steps] == [[1, 3, 5, 7, 9, 11, 13, 15], [17, 19, 21, 23, 25, 27, 29, 31]]


def test_validation_covers_each_rank_shard_with_a_short_last_batch():
    steps = val_steps({"b": 10, "a": 5}, 3, rank=0, world=2)
    assert [(s.task, s.rows.tolist()) for s in steps] == [("a", [0, 2, 4]), ("b", [0, 2, 4]), ("b", [6, 8])]
    other = val_steps({"b": 10, "a": 5}, 3, rank=1, world=2)
    assert [(s.task, s.rows.tolist()) for s in other] == [("a", [1, 3]), ("b", [1, 3, 5]), ("b", [7, 9])]


@pytest.mark.parametrize("world", [1, 3, 8, 64])
def test_validation_reads_every_row_once_whatever_the_world(world):
    """The metrics are the whole set's at any world size (an elastic run's epochs compare), a task
    smaller than the world included: some ranks then have none of it."""
    n_rows = {"a": 50, "b": 7, "c": 200}
    read = {task: [] for task in n_rows}
    for rank in range(world):
        for step in val_steps(n_rows, 16, rank=rank, world=world):
            read[step.task] += step.rows.tolist()
    assert {task: sorted(rows) for task, rows in read.items()} == {task: list(range(n)) for task, n in n_rows.items()}


@pytest.mark.parametrize("world", [1, 3, 4])
def test_rank_rows_counts_what_rank_steps_gives_each_rank(world):
    schedule = TaskSchedule({"a": 7, "b": 3}, 0, 0, "shuffled").steps()
    steps = global_steps(schedule, {"a": 100, "b": 50}, 13)
    for rank in range(world):
        mine = rank_steps(steps, {"a": 100, "b": 50}, seed=0, epoch=0, rank=rank, world=world)
        assert rank_rows(steps, rank, world) == sum(len(s.rows) for s in mine)
