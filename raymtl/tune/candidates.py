"""The groupings a sweep trains: baselines, the searched (by measured affinity), listed or configured ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raymtl import storage
from raymtl.config import ConfigError, Experiment
from raymtl.tune.spec import SEARCH, SweepSpec

if TYPE_CHECKING:  # torch comes with the functions that need it
    import torch

    from raymtl.tune.groupings import Grouping

CANDIDATES_FILE = "candidates.json"


@dataclass
class Candidate:
    """A grouping to train, named; `score` is its affinity score when Z was measured."""

    name: str
    groups: Grouping
    score: float | None = None


def read_affinity(run_dir: str) -> tuple[list[str], torch.Tensor]:
    """(tasks, mean Z) from a run's affinity.json (AffinityTracker.to_dict format)."""
    import torch

    from raymtl.train.report import AFFINITY_FILE

    path = storage.join(run_dir, AFFINITY_FILE)
    if not storage.exists(path):
        raise ConfigError(
            f"{path} does not exist: the search run measured no affinity "
            "(is sweep.affinity_every_steps, by default derived from the task count so that measuring "
            "costs at most sweep.affinity_share of the run, larger than the steps it ran? "
            "set it, or raise affinity_epochs)"
        )
    data = json.loads(storage.read_text(path))
    if data["mean"] is None:
        raise ConfigError(f"{path}: every affinity measurement of the search run ({data['skipped']}) had a non-finite "
                          "loss (NaN or inf): it diverged; lower its lr, or check the tasks' losses")
    return list(data["tasks"]), torch.tensor(data["mean"], dtype=torch.float64)


def candidates(
    exp: Experiment, spec: SweepSpec, affinity: tuple[list[str], torch.Tensor] | None
) -> list[Candidate]:
    """The groupings to train: baselines first, then searched / listed / configured; duplicates dropped.

    A grouping found twice keeps its first name, so the baselines are always called
    `one_group` and `one_per_task` even when the search ranks one of them first.
    """
    from raymtl.tune.groupings import baseline_groupings, best_groupings, score_partition

    named: dict[str, Grouping] = dict(baseline_groupings(exp.task_names)) if spec.baselines else {}
    if spec.groupings == SEARCH:
        if affinity is None:
            raise ValueError("groupings: search needs the measured affinity")
        tasks, z = affinity
        if sorted(tasks) != sorted(exp.task_names):
            raise ConfigError(f"the affinity is measured for tasks {tasks}, the experiment has {exp.task_names}")
        found = best_groupings(z, tasks, spec.max_groups, spec.top)
        named.update({f"search{k + 1}": g for k, (g, _) in enumerate(found)})
    elif spec.groupings is None:
        named["config"] = exp.task_groups()
    else:
        named.update({f"grouping{k + 1}": g for k, g in enumerate(spec.groupings)})
    seen: set[frozenset] = set()
    out = []
    for name, groups in named.items():
        key = frozenset(frozenset(tasks) for tasks in groups.values())
        if key not in seen:
            seen.add(key)
            score = score_partition(groups, affinity[1], affinity[0]) if affinity else None
            out.append(Candidate(name, groups, score))
    return out


def format_groups(groups: Grouping) -> str:
    return " | ".join("+".join(tasks) for tasks in groups.values())
