"""Where an epoch's training time goes: waiting for batches vs computing on them.

An epoch's batches come from the decoded cache or from one stream of decode tasks; when the stream
falls behind, the loop waits. `StepTimer` measures that wait per step so a run reports it
(`perf/data_wait_fraction`) instead of leaving it to guesswork. The first batch of each task in an
epoch waits for the stream to start and is counted apart (`perf/first_batch_wait_s`), so the
fraction describes the steady state.
`perf/epoch_s`, `perf/steps_s` (forward, backward and update of every step) and `perf/eval_s` put
the steps in proportion to the whole epoch; `perf/first_step_unix` (wall clock when the epoch's first
step ended) lets a benchmark measure start-up from outside the run.

On a GPU the host only queues kernels: its clock would time the launches, and a wait for data
while the GPU is still busy with the previous step would count as waiting although nothing idled.
There each mark is a CUDA event recorded on the stream, so a step's wait is the time the GPU had
nothing queued between the previous step's end and the batch's arrival, and its compute the GPU's
time on the step. The events are read once, at the epoch's end (`metrics`: one synchronisation);
an ordinary step adds none. `perf/peak_gpu_mb` is the device's peak allocated memory so far.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class StepTimer:
    """This rank's timings of one epoch, from its creation at the epoch start.

    Per step call `begin()`, `fetched()` after getting the batch and `done()` after the step;
    `streams_started()` after opening the task streams, `eval_started()` before evaluating.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self.first_wait = 0.0
        self.first_step_unix: float | None = None
        self.steps: list[tuple[str, int, Any, Any, Any]] = []  # (task, samples, begin, fetched, done) marks
        self.epoch_start = self._start = time.perf_counter()
        self._begin = self._got = None
        self._eval_start = 0.0

    def _mark(self) -> Any:
        """A point in time: a CUDA event queued on the current stream, or the host clock."""
        if self.device is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _span(self, a: Any, b: Any) -> float:
        return b - a if self.device is None else a.elapsed_time(b) / 1000.0

    def begin(self) -> None:
        self._start = time.perf_counter()
        self._begin = self._start if self.device is None else self._mark()

    def streams_started(self) -> None:
        """After opening the epoch's task streams (their first batches asked for at once)."""
        self.first_wait += time.perf_counter() - self._start

    def fetched(self) -> None:
        self._got = self._mark()

    def done(self, task: str, samples: int) -> None:
        self.steps.append((task, samples, self._begin, self._got, self._mark()))
        if self.first_step_unix is None:
            self.first_step_unix = time.time()

    def eval_started(self) -> None:
        self._eval_start = time.perf_counter()

    def metrics(self, world_size: int) -> dict[str, float]:
        """`perf/*` values of this rank's epoch until now (steady state; samples/s scaled to all ranks)."""
        if self.device is not None:
            torch.cuda.synchronize(self.device)  # the one sync: every event of the epoch has completed
        end = time.perf_counter()
        started: set[str] = set()
        first_wait, wait, busy, compute, samples = self.first_wait, 0.0, 0.0, 0.0, 0
        for task, n, begin, got, done in self.steps:
            step_wait, step_busy = self._span(begin, got), self._span(got, done)
            compute += step_busy
            if task in started:
                wait += step_wait
                busy += step_busy
                samples += n
            else:
                started.add(task)
                first_wait += step_wait
        out = {
            "perf/first_batch_wait_s": first_wait,
            "perf/epoch_s": end - self.epoch_start,
            "perf/eval_s": end - self._eval_start,
            "perf/steps_s": compute,
        }
        if self.first_step_unix is not None:
            out["perf/first_step_unix"] = self.first_step_unix
        if wait + busy:
            out["perf/data_wait_fraction"] = wait / (wait + busy)
            out["perf/samples_per_s"] = world_size * samples / (wait + busy)
        if self.device is not None:
            out["perf/peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out
