"""This rank's batches, step by step: its plan (`raymtl.data.plan`) read from the task inputs.

One source per epoch and split, whatever the number of tasks: the decoded-input cache when there is
one (rows gathered from the node's shared copy), else one stream of decode tasks in plan order
(`datasets.stream`: bounded, so memory does not grow with the task count or the catalogue).

The hot path runs off the training thread: a background thread (`Prefetcher`) takes each step's
decoded rows, drops unreadable ones (`BadRows`), copies them into pinned memory and to the device
on a side CUDA stream, and finishes them there (`DeviceInputs`: normalised images), a bounded
queue ahead of the loop; the step waits only when the data is truly late. On a CPU the same thread
prepares the tensors. Its exceptions reach the training thread as they were raised.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from raymtl.console import root_cause
from raymtl.data.datasets import Decoded, DecodedCache, TaskInputs, dataset_key, decode_slots, stream
from raymtl.data.device_inputs import DeviceInputs, host_tensor
from raymtl.data.plan import Step
from raymtl.data.task_info import TaskInfo
from raymtl.errors import DataError

logger = logging.getLogger("raymtl")
_DEPTH = 2  # batches ready on the device ahead of the step


def batches_per_epoch(infos: dict[str, TaskInfo], batch_size: int, world_size: int) -> dict[str, int]:
    """Full batches each rank gets per task: shards are equal-sized, the last partial batch dropped."""
    return {name: (info.n_train // world_size) // batch_size for name, info in infos.items()}


class BadRows:
    """Rows dropped for unreadable images in one split of one epoch on this rank, and their cap.

    Past `max_fraction` of the split's planned rows the run stops with one line naming the count
    and the first files: a `DataError`, which no retry can fix (the data order is deterministic).
    """

    def __init__(self, split: str, planned: int, max_fraction: float) -> None:
        self.split, self.planned = split, planned
        self.max_fraction = max_fraction
        self.limit = int(max_fraction * planned)
        self.count = 0
        self.first: list[str] = []

    def drop(self, task: str, decoded: Decoded) -> Decoded:
        if not decoded.errors:
            return decoded
        messages = list(decoded.errors.values())
        self.count += len(messages)
        self.first.extend(messages[: 3 - len(self.first)])
        if self.count > self.limit:
            raise DataError(
                f"{self.count} of this rank's {self.planned} {self.split} rows have unreadable images, more than "
                f"data.max_bad_fraction={self.max_fraction:g} allows ({self.limit}); first: {' | '.join(self.first)} "
                "(raise data.max_bad_fraction to skip more, data.skip_bad_images: false stops at the first)"
            )
        logger.warning("task %r: skipped %d of %d rows with unreadable images: %s",
                       task, len(messages), len(decoded), "; ".join(messages[:5]))
        return decoded.without_errors()


class Prefetcher:
    """`items` drawn and prepared by a background thread, at most `depth` ahead of `get`.

    On CUDA the thread works on its own stream and records an event after each item; `get` makes
    the current stream wait for it (not the host) and marks the tensors as used there.
    """

    _END = object()

    def __init__(self, items: Iterator[Any], device: torch.device, depth: int = _DEPTH) -> None:
        self.device = device
        self.queue: queue.Queue = queue.Queue(depth)
        self.stopped = threading.Event()
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        threading.Thread(target=self._run, args=(items,), daemon=True, name="raymtl-batches").start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
                for item in items:
                    event = torch.cuda.Event() if self.cuda else None
                    if event is not None:
                        event.record(self.side)
                    if not self._put((item, event)):
                        return
            self._put((self._END, None))
        except BaseException as error:  # noqa: BLE001 -- handed to the training thread, raised there
            self._put((error, None))

    def _put(self, entry: tuple) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        item, event = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        if event is not None and item is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in item.values():
                tensor.record_stream(current)
        return item

    def stop(self) -> None:
        self.stopped.set()


class TaskBatches:
    """The batches of `steps` (one split of this rank's plan), in order, ready for the model.

    `next(task)` returns the next step's batch, which must be of `task` (the loop's schedule and
    the plan are the same sequence), or None when the step has no rows for this rank (the short
    last step of a resized epoch) or bad-image rows (skipped) emptied it. Preparing starts at once,
    in the background. `slots`: decode tasks kept running when streaming (default:
    `datasets.decode_slots` for one rank on one CPU).
    """

    def __init__(
        self,
        inputs: TaskInputs,
        split: str,
        steps: list[Step],
        device_inputs: DeviceInputs,
        cache: DecodedCache | None,
        *,
        slots: int | None = None,
        planned: int | None = None,
    ) -> None:
        self.steps, self.device_inputs = steps, device_inputs
        self.i = 0
        # `planned`: the rows the cap on unreadable ones is a fraction of (default: those of `steps`), the
        # whole epoch's for a resumed one, so a resume does not shrink the cap to the rows left
        planned = sum(len(s.rows) for s in steps) if planned is None else planned
        self.bad = BadRows(split, planned, inputs.max_bad_fraction)
        read = [s for s in steps if len(s.rows)]  # a resized epoch's short last step may leave a rank none
        if cache is not None:
            raw: Iterator[Decoded] = (cache.gather(dataset_key(s.task, split), s.rows) for s in read)
        else:
            raw = stream(inputs, split, read, slots if slots is not None else decode_slots(1, 1.0))
        # the thread holds what it reads, not `self`: an abandoned epoch's thread is stopped
        prepared = (_prepare(self.bad, device_inputs, step, decoded) for step, decoded in zip(read, raw))
        self.prefetch = Prefetcher(prepared, device_inputs.device)
        weakref.finalize(self, self.prefetch.stop)

    def next(self, task: str) -> dict[str, torch.Tensor] | None:
        step = self.steps[self.i]
        if step.task != task:
            raise RuntimeError(f"step {self.i} of the plan is task {step.task!r}, the schedule says {task!r}")
        self.i += 1
        if not len(step.rows):
            return None
        try:
            return self.prefetch.get()
        except Exception as error:
            # A decode task's failure (a bad image) arrives under Ray's wrappers: raise the cause
            # itself, with its own message.
            cause = root_cause(error)
            if cause is error:
                raise
            raise cause from error

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor] | None]]:
        while self.i < len(self.steps):
            task = self.steps[self.i].task
            yield task, self.next(task)

    def close(self) -> None:
        self.prefetch.stop()


def _prepare(bad: BadRows, device_inputs: DeviceInputs, step: Step, decoded: Decoded) -> dict[str, torch.Tensor] | None:
    """In the background thread: a step's good rows, pinned, on the device, finished (`DeviceInputs`)."""
    decoded = bad.drop(step.task, decoded)
    if not len(decoded):
        return None
    pin = device_inputs.device.type == "cuda"
    host = {k: host_tensor(v, pin) for k, v in decoded.arrays.items()}
    return device_inputs(host, non_blocking=pin)
