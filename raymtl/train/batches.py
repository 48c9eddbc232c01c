"""This rank's batches of every task: per-task shard iterators positioned for (epoch, step)."""

from __future__ import annotations

import itertools
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import ray.train
import torch

from raymtl.config import Experiment
from raymtl.data.datasets import dataset_key
from raymtl.data.tables import TaskInfo


def batches_per_epoch(infos: dict[str, TaskInfo], batch_size: int, world_size: int) -> dict[str, int]:
    """Full batches each rank gets per task: shards are equal-sized, the last partial batch dropped."""
    return {name: (info.n_train // world_size) // batch_size for name, info in infos.items()}


def to_model_batch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Numeric columns as tensors on the device; string columns (task tag, id) stay behind."""
    return {k: torch.as_tensor(v).to(device) for k, v in batch.items() if v.dtype.kind in "biuf"}


def shuffle_seed(seed: int, epoch: int, task: str, epoch_pass: int) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{task}:{epoch_pass}".encode())


class TaskBatches:
    """Per-task batch iterators over this rank's shards, positioned for (epoch, step).

    A task's iterator restarts (a new "pass", reshuffled) when a sampling schedule asks for more
    batches than one pass holds. On resume, the batches already consumed are read and skipped,
    so the data order matches an uninterrupted run.
    """

    def __init__(self, exp: Experiment, batches: dict[str, int], epoch: int, consumed: dict[str, int], device):
        self.exp, self.batches, self.epoch, self.device = exp, batches, epoch, device
        self.passes = {t: consumed.get(t, 0) // n for t, n in batches.items()}
        self.iters: dict[str, Iterator] = started({t: self._open(t) for t in batches})
        for task, count in consumed.items():
            for _ in range(count % batches[task]):
                self._next_raw(task)

    def _open(self, task: str) -> Iterable:
        shard = ray.train.get_dataset_shard(dataset_key(task, "train"))
        buffer = self.exp.data.shuffle_buffer or None
        return shard.iter_batches(
            batch_size=self.exp.training.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=shuffle_seed(self.exp.seed, self.epoch, task, self.passes[task]) if buffer else None,
        )

    def _next_raw(self, task: str) -> dict[str, np.ndarray] | None:
        return next(self.iters[task], None)

    def next(self, task: str) -> dict[str, torch.Tensor] | None:
        """The task's next batch; None when its shard ran short (rows dropped as bad images)."""
        batch = self._next_raw(task)
        if batch is None and self.exp.training.sampler != "shuffled":
            self.passes[task] += 1
            self.iters[task] = iter(self._open(task))
            batch = self._next_raw(task)
        return None if batch is None else to_model_batch(batch, self.device)


def started(streams: dict[str, Iterable]) -> dict[str, Iterator]:
    """Iterators over `streams` whose first items were all asked for at once.

    A Ray Data stream starts executing only when its first batch is requested, which takes a
    second or more (scheduling its read and decode tasks). Requesting every task's first batch
    together overlaps those starts instead of paying them one after another at each task's first
    step. Every rank still consumes each stream in the same order afterwards.
    """
    iters = {name: iter(s) for name, s in streams.items()}

    def first(it: Iterator) -> list:
        return list(itertools.islice(it, 1))

    with ThreadPoolExecutor(max_workers=max(1, len(iters)), thread_name_prefix="raymtl-start") as pool:
        heads = dict(zip(iters, pool.map(first, iters.values())))
    return {name: itertools.chain(heads[name], it) for name, it in iters.items()}


def consumed_batches(steps_done: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in steps_done:
        counts[task] = counts.get(task, 0) + 1
    return counts


