"""TaskSchedule: which task each step of an epoch trains on.

The order is a pure function of (seed, epoch, per-task batch counts, mode), so every rank and
every resumed run computes the identical sequence without communicating. A rank that picked its
own random task would deadlock the gradient sync (each task's step all-reduces its own parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymtl.config import SAMPLERS, ConfigError


@dataclass(frozen=True)
class TaskSchedule:
    """The sequence of task names for one epoch.

    Modes:
      shuffled      every batch of every task exactly once, in random order (Octopod; default)
      proportional  each step draws a task with p proportional to its batch count
      uniform       each step draws a task uniformly
      temperature   p proportional to n ** (1 / T): T=1 is proportional, large T tends to uniform
    Sampling modes run as many steps as `shuffled` (the total batch count), so an epoch costs the
    same whatever the mode; each task's data iterator restarts when a sampled task runs out.
    """

    batches: dict[str, int]
    seed: int
    epoch: int
    mode: str = "shuffled"
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.mode!r}; choose one of {', '.join(SAMPLERS)}")
        if self.temperature <= 0:
            raise ConfigError(f"sampler temperature must be > 0, got {self.temperature}")
        empty = [t for t, n in self.batches.items() if n < 1]
        if empty:
            raise ConfigError(
                f"tasks {empty} have no full batch per worker this epoch: add data, "
                "lower training.batch_size or use fewer workers"
            )

    def probabilities(self) -> np.ndarray:
        """Per-task draw probability in `self.tasks` order (shuffled: the expected share)."""
        n = np.array([self.batches[t] for t in self.tasks], dtype=np.float64)
        if self.mode == "uniform":
            w = np.ones_like(n)
        elif self.mode == "temperature":
            w = n ** (1.0 / self.temperature)
        else:
            w = n
        return w / w.sum()

    @property
    def tasks(self) -> list[str]:
        """Task names in a canonical order, independent of dict insertion order."""
        return sorted(self.batches)

    def __len__(self) -> int:
        return sum(self.batches.values())

    def steps(self, start: int = 0) -> list[str]:
        """The task of every step from `start` (a resume position) to the end of the epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        tasks = self.tasks
        if self.mode == "shuffled":
            order = np.repeat(np.arange(len(tasks)), [self.batches[t] for t in tasks])
            rng.shuffle(order)
        else:
            order = rng.choice(len(tasks), size=len(self), p=self.probabilities())
        return [tasks[i] for i in order[start:]]
