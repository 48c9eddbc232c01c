"""This rank's batches, step by step: its plan (`raymtl.data.plan`) read from the task inputs.

One source per epoch and split, whatever the number of tasks: the decoded-input cache when there is
one (batches gathered in this process, no stream at all), else one Ray Data stream of the plan's
batches decoded ahead of the loop (bounded prefetch, so memory does not grow with the task count).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from raymtl.console import root_cause
from raymtl.data.datasets import DecodedCache, TaskInputs, dataset_key, stream
from raymtl.data.plan import Step
from raymtl.data.task_info import TaskInfo

logger = logging.getLogger("raymtl")
_FIRST_FETCH = ThreadPoolExecutor(max_workers=4, thread_name_prefix="raymtl-first-batch")


def started(items: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """`items` whose first element is already being fetched, in a background thread.

    A Ray Data stream starts executing only when its first batch is asked for (scheduling decode
    tasks, and on a fresh cluster starting their worker processes): asking at once overlaps that
    with whatever the loop does before it needs the batch (model set-up, the epoch's steps).
    """
    first = _FIRST_FETCH.submit(next, items, None)

    def chained() -> Iterator[dict[str, np.ndarray]]:
        head = first.result()
        if head is not None:
            yield head
            yield from items

    return chained()


def batches_per_epoch(infos: dict[str, TaskInfo], batch_size: int, world_size: int) -> dict[str, int]:
    """Full batches each rank gets per task: shards are equal-sized, the last partial batch dropped."""
    return {name: (info.n_train // world_size) // batch_size for name, info in infos.items()}


def to_model_batch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Numeric columns as tensors on the device; string columns (task tag, id, error) stay behind.

    The arrays are this process's own (gathered or unpickled), so they are wrapped, not copied; on a
    GPU they are pinned and copied without blocking the step.
    """
    out = {k: torch.from_numpy(v) for k, v in batch.items() if v.dtype.kind in "biuf"}
    if device.type == "cuda":
        out = {k: t.pin_memory().to(device, non_blocking=True) for k, t in out.items()}
    return out


class TaskBatches:
    """The batches of `steps` (one split of this rank's plan), in order, ready for the model.

    `next(task)` returns the next step's batch, which must be of `task` (the loop's schedule and
    the plan are the same sequence), or None when the step has no rows for this rank (the short
    last step of a resized epoch) or bad-image rows (skipped) emptied it.
    """

    def __init__(
        self, inputs: TaskInputs, split: str, steps: list[Step], device: torch.device, cache: DecodedCache | None
    ) -> None:
        self.steps, self.device, self.skip = steps, device, inputs.skip_bad_images
        self.i = 0
        read = [s for s in steps if len(s.rows)]
        if cache is not None:
            self.raw: Iterator[dict[str, np.ndarray]] = (cache.gather(dataset_key(s.task, split), s.rows) for s in read)
        else:
            self.raw = started(stream(inputs, split, read))

    def next(self, task: str) -> dict[str, torch.Tensor] | None:
        step = self.steps[self.i]
        if step.task != task:
            raise RuntimeError(f"step {self.i} of the plan is task {step.task!r}, the schedule says {task!r}")
        self.i += 1
        if not len(step.rows):
            return None
        try:
            batch = next(self.raw)
        except Exception as error:
            # A decode task's failure (a bad image) arrives under Ray Data's wrappers, whose causes
            # do not survive the trip to the driver: raise the cause itself, with its own message.
            cause = root_cause(error)
            if cause is error:
                raise
            raise cause from error
        if "error" in batch:
            batch = self._without_bad_rows(task, batch)
        return to_model_batch(batch, self.device) if len(batch["task"]) else None

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor] | None]]:
        while self.i < len(self.steps):
            task = self.steps[self.i].task
            yield task, self.next(task)

    def _without_bad_rows(self, task: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch.pop("error")
        bad = errors != ""
        if bad.any():
            logger.warning("task %r: skipped %d of %d rows with unreadable images: %s",
                           task, bad.sum(), len(bad), "; ".join(errors[bad][:5]))
        return {k: v[~bad] for k, v in batch.items()}
