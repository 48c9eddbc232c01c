"""Which rows of which task every step of this rank reads: a pure function of the run's settings.

A task's rows are shuffled once per (seed, epoch, task, pass) into one global order, and rank `r`
of `W` takes every W-th row of it from position r, as PyTorch's `DistributedSampler` does: equal
shards, no row on two ranks, and the first k batches of every rank together are exactly the first
k * batch_size * W rows of the global order.

The plan is built in two layers. The epoch's *global* plan (`GlobalStep`s) says which slice
`[start, stop)` of which task's pass every step reads, all ranks together; a rank's plan
(`rank_steps`) is every W-th row of each slice. Each task reads its pass's order from a cursor: a
step takes the next `batch_size * W` rows, and a step that would run past the pass's end starts
the next, reshuffled pass (drop_last). Because what a task has consumed is always a prefix of its
order, the rest of an epoch can be re-planned for another world size (`rechunk`): the same rows,
each exactly once, in the same order of global samples. `epoch_plan` replays an epoch's resizes.

Nothing here talks to Ray; `raymtl.data.datasets` turns a plan into a Ray Data stream of decoded
batches and `raymtl.train.batches` feeds them to the loop.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Step:
    """One batch this rank reads: `rows` of task `task`'s split, in order."""

    task: str
    rows: np.ndarray  # int64 indices into the task split's table


@dataclass(frozen=True)
class GlobalStep:
    """One step of all ranks together: positions `[start, stop)` of pass `epoch_pass` of `task`'s order."""

    task: str
    epoch_pass: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Global samples this step trains on."""
        return self.stop - self.start


def shuffle_seed(seed: int, epoch: int, task: str, epoch_pass: int) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{task}:{epoch_pass}".encode())


def global_order(n: int, seed: int, epoch: int, task: str, epoch_pass: int, shuffle: bool = True) -> np.ndarray:
    """The order of a task's `n` training rows in one pass of an epoch: shuffled, or as stored."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(shuffle_seed(seed, epoch, task, epoch_pass)).permutation(n)


def global_steps(schedule: list[str], n_rows: dict[str, int], size: int) -> list[GlobalStep]:
    """The epoch's steps for the task `schedule` (one task name per step), `size` rows each (all
    ranks together). A task's k-th step is batch `k % per_pass` of pass `k // per_pass`, where
    `per_pass = n // size` (= `(n // world) // batch_size` for a per-worker batch): the cursor rule
    gives exactly that."""
    cursor: dict[str, tuple[int, int]] = {}
    steps = []
    for task in schedule:
        n = n_rows[task]
        if n < size:
            raise ValueError(f"task {task!r}: {n} rows fill no step of {size} rows")
        epoch_pass, start = cursor.get(task, (0, 0))
        if start + size > n:
            epoch_pass, start = epoch_pass + 1, 0
        steps.append(GlobalStep(task, epoch_pass, start, start + size))
        cursor[task] = (epoch_pass, start + size)
    return steps


def rechunk(steps: list[GlobalStep], size: int) -> list[GlobalStep]:
    """`steps` (the rest of an epoch) re-cut into steps of `size` global samples: the same rows.

    A task's rows of one pass that `steps` reads back to back form a run; each run is cut into
    `size`-row steps from its start, the last one short when `size` does not divide it (no row
    skipped, none read twice). A new step goes where the old step holding its first row was, so the
    order of global samples is kept: halving the size turns every old step into two consecutive
    new ones, doubling it merges a task's consecutive pairs.
    """
    runs: list[tuple[str, int, int, int]] = []  # task, pass, start, stop
    where: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (task, pass) -> (start, index) of its old steps, in order
    last: dict[str, int] = {}
    for i, s in enumerate(steps):
        where.setdefault((s.task, s.epoch_pass), []).append((s.start, i))
        j = last.get(s.task)
        if j is not None and runs[j][1] == s.epoch_pass and runs[j][3] == s.start:
            runs[j] = (s.task, s.epoch_pass, runs[j][2], s.stop)
        else:
            last[s.task] = len(runs)
            runs.append((s.task, s.epoch_pass, s.start, s.stop))
    keyed = []
    for task, epoch_pass, start, stop in runs:
        olds = where[(task, epoch_pass)]
        starts = [o[0] for o in olds]
        for first in range(start, stop, size):
            old_start, index = olds[bisect.bisect_right(starts, first) - 1]
            keyed.append(((index, first - old_start), GlobalStep(task, epoch_pass, first, min(first + size, stop))))
    return [step for _, step in sorted(keyed, key=lambda kv: kv[0])]


def epoch_plan(schedule: list[str], n_rows: dict[str, int], worlds: list[tuple[int, int, int]]) -> list[GlobalStep]:
    """An epoch's global plan through its resizes: `worlds` = [(world, step size, from_step), ...].

    The first entry (from step 0) plans the epoch's `schedule`; each later one re-cuts the steps
    from `from_step` on to its step size (`rechunk`: the global batch of its world).
    """
    (_, size, _), *resizes = worlds
    steps = global_steps(schedule, n_rows, size)
    for _, size, at in resizes:
        steps = steps[:at] + rechunk(steps[at:], size)
    return steps


def rank_steps(
    steps: list[GlobalStep], n_rows: dict[str, int], *, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True
) -> list[Step]:
    """This rank's batches of `steps`: every `world`-th row of each step's slice, from position `rank`
    (a step that `world` does not divide, short or of a global batch, gives some ranks a row fewer)."""
    orders: dict[tuple[str, int], np.ndarray] = {}
    out = []
    for s in steps:
        key = (s.task, s.epoch_pass)
        if key not in orders:
            orders[key] = global_order(n_rows[s.task], seed, epoch, s.task, s.epoch_pass, shuffle)
        out.append(Step(s.task, orders[key][s.start + rank : s.stop : world].astype(np.int64)))
    return out


def rank_rows(steps: list[GlobalStep], rank: int, world: int) -> int:
    """How many rows `rank_steps` gives `rank` of `steps`, without their orders."""
    return sum(len(range(s.start + rank, s.stop, world)) for s in steps)


def train_steps(
    schedule: list[str],
    n_rows: dict[str, int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    start: int = 0,
    shuffle: bool = True,
) -> list[Step]:
    """This rank's batches for the epoch's `schedule` (one task name per step), from step `start`,
    on a world that has not changed during the epoch. Sampling schedules that ask for more batches
    than a pass holds start a new, reshuffled pass."""
    steps = global_steps(schedule, n_rows, batch_size * world)[start:]
    return rank_steps(steps, n_rows, seed=seed, epoch=epoch, rank=rank, world=world, shuffle=shuffle)


def consumed_rows(steps: list[GlobalStep]) -> dict[str, int]:
    """Rows each task's `steps` read (all ranks, all passes): what a checkpoint records of an epoch."""
    out: dict[str, int] = {}
    for s in steps:
        out[s.task] = out.get(s.task, 0) + s.size
    return out


def val_steps(n_rows: dict[str, int], batch_size: int, *, rank: int, world: int) -> list[Step]:
    """This rank's validation batches: every W-th row from position `rank`, tasks in name order.

    Every row is read once, whatever the world size (ranks differ by at most a row per task, and a
    rank may have none of a small task's): the metrics are the whole validation set's at any world
    size, so an elastic run's epochs compare. Validation's collectives do not depend on the batches
    (`raymtl.train.evaluation`). The last batch of a task may be short.
    """
    steps = []
    for task in sorted(n_rows):
        mine = np.arange(rank, n_rows[task], world, dtype=np.int64)
        steps += [Step(task, mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]
    return steps
