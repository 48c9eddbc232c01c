"""Where an epoch's training time goes: waiting for batches vs computing on them.

Ray Data feeds each task's steps from its own stream; when a stream falls behind, the loop waits.
`StepTimer` measures that wait per step so a run reports it (`perf/data_wait_fraction`) instead of
leaving it to guesswork. The first batch of each task in an epoch waits for its stream to start and
is counted apart (`perf/first_batch_wait_s`), so the fraction describes the steady state.
`perf/epoch_s`, `perf/steps_s` (forward, backward and update of every step) and `perf/eval_s` put
the steps in proportion to the whole epoch; `perf/first_step_unix` (wall clock when the epoch's first
step ended) lets a benchmark measure start-up from outside the run.
"""

from __future__ import annotations

import time


class StepTimer:
    """This rank's timings of one epoch, from its creation at the epoch start.

    Per step call `begin()`, `fetched()` after getting the batch and `done()` after the step;
    `streams_started()` after opening the task streams, `eval_started()` before evaluating.
    """

    def __init__(self) -> None:
        self.started: set[str] = set()
        self.first_wait = self.wait = self.busy = self.compute = 0.0
        self.first_step_unix: float | None = None
        self.samples = 0
        self.epoch_start = self._start = time.perf_counter()
        self._got = self._eval_start = 0.0

    def begin(self) -> None:
        self._start = time.perf_counter()

    def streams_started(self) -> None:
        """After opening the epoch's task streams (their first batches asked for at once)."""
        self.first_wait += time.perf_counter() - self._start

    def fetched(self) -> None:
        self._got = time.perf_counter()

    def done(self, task: str, samples: int) -> None:
        end = time.perf_counter()
        wait = self._got - self._start
        self.compute += end - self._got
        if self.first_step_unix is None:
            self.first_step_unix = time.time()
        if task in self.started:
            self.wait += wait
            self.busy += end - self._got
            self.samples += samples
        else:
            self.started.add(task)
            self.first_wait += wait

    def eval_started(self) -> None:
        self._eval_start = time.perf_counter()

    def metrics(self, world_size: int) -> dict[str, float]:
        """`perf/*` values of this rank's epoch until now (steady state; samples/s scaled to all ranks)."""
        end = time.perf_counter()
        out = {
            "perf/first_batch_wait_s": self.first_wait,
            "perf/epoch_s": end - self.epoch_start,
            "perf/eval_s": end - self._eval_start,
            "perf/steps_s": self.compute,
        }
        if self.first_step_unix is not None:
            out["perf/first_step_unix"] = self.first_step_unix
        total = self.wait + self.busy
        if total:
            out["perf/data_wait_fraction"] = self.wait / total
            out["perf/samples_per_s"] = world_size * self.samples / total
        return out
