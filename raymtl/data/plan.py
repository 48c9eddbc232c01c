"""Which rows of which task every step of this rank reads: a pure function of the run's settings.

A task's rows are shuffled once per (seed, epoch, task, pass) into one global order, and rank `r`
of `W` takes every W-th row of it from position r, as PyTorch's `DistributedSampler` does: equal
shards, no row on two ranks, and the first k batches of every rank together are exactly the first
k * batch_size * W rows of the global order. That last property makes a resume exact at any world
size: what is left of a task's pass is the tail of its global order, whoever reads it.

Nothing here talks to Ray; `raymtl.data.datasets` turns a plan into a Ray Data stream of decoded
batches and `raymtl.train.batches` feeds them to the loop.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Step:
    """One batch this rank reads: `rows` of task `task`'s split, in order."""

    task: str
    rows: np.ndarray  # int64 indices into the task split's table


def shuffle_seed(seed: int, epoch: int, task: str, epoch_pass: int) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{task}:{epoch_pass}".encode())


def global_order(n: int, seed: int, epoch: int, task: str, epoch_pass: int, shuffle: bool = True) -> np.ndarray:
    """The order of a task's `n` training rows in one pass of an epoch: shuffled, or as stored."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(shuffle_seed(seed, epoch, task, epoch_pass)).permutation(n)


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
    """This rank's batches for the epoch's `schedule` (one task name per step), from step `start`.

    A task's k-th batch of the epoch is batch `k % per_pass` of pass `k // per_pass`, where
    `per_pass = (n // world) // batch_size` (full batches only: drop_last). Sampling schedules that
    ask for more batches than a pass holds start a new, reshuffled pass.
    """
    orders: dict[tuple[str, int], np.ndarray] = {}
    seen: dict[str, int] = {}
    steps = []
    for i, task in enumerate(schedule):
        k = seen.get(task, 0)
        seen[task] = k + 1
        if i < start:
            continue
        per_pass = (n_rows[task] // world) // batch_size
        if per_pass < 1:
            raise ValueError(f"task {task!r}: {n_rows[task]} rows fill no batch of {batch_size} on {world} workers")
        epoch_pass, b = divmod(k, per_pass)
        key = (task, epoch_pass)
        if key not in orders:
            orders[key] = global_order(n_rows[task], seed, epoch, task, epoch_pass, shuffle)
        first = b * batch_size * world + rank
        steps.append(Step(task, orders[key][first : first + batch_size * world : world].astype(np.int64)))
    return steps


def val_steps(n_rows: dict[str, int], batch_size: int, *, rank: int, world: int) -> list[Step]:
    """This rank's validation batches: every W-th row from position `rank`, tasks in name order.

    Each rank gets `n // world` rows (equal shards: the last `n % world` rows are left out when the
    world does not divide them, as Ray's equal split did); the last batch of a task may be short.
    """
    steps = []
    for task in sorted(n_rows):
        mine = np.arange(rank, (n_rows[task] // world) * world, world, dtype=np.int64)
        steps += [Step(task, mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]
    return steps
