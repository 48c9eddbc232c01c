"""A sweep's outcome: one record per trial, the chosen configuration, the summary files and table."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from raymtl import storage
from raymtl.tune.candidates import Candidate, format_groups
from raymtl.tune.spec import hashable

T = TypeVar("T")


@dataclass
class TrialRecord:
    """One finished (or stopped, or failed) trial: its config, best epoch and cost."""

    trial_id: str
    config: dict[str, Any]
    wall_s: float
    best: dict[str, Any] | None = None  # the metrics row of its best epoch by the sweep metric
    epochs: int = 0
    checkpoint: str | None = None  # the checkpoint saved at that epoch (a loadable model)
    error: str | None = None


@dataclass
class Choice:
    """The winning configuration: best sweep metric averaged over its seeds (ensemble members)."""

    config: dict[str, Any]  # trial config without the seed
    score: float
    trial_id: str  # its best member
    members: list[str]  # every trial of that configuration


@dataclass
class SweepResult:
    sweep_dir: str
    metric: str
    tasks: list[str]
    candidates: list[Candidate]
    trials: list[TrialRecord]
    choice: Choice | None
    search_s: float = 0.0  # wall time of the affinity run (0 without search)
    best_model: str | None = None
    ensemble: dict[str, Any] | None = None  # model, members, split, its metrics, mean_score, best member's

    @property
    def trial_hours(self) -> float:
        return sum(t.wall_s for t in self.trials) / 3600

    @property
    def total_hours(self) -> float:
        return self.trial_hours + self.search_s / 3600

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per trial: config, per-task primary metrics and the sweep metric at its best epoch."""
        groups = {c.name: c.groups for c in self.candidates}
        winner = self.choice.trial_id if self.choice else None
        out = []
        for t in self.trials:
            best = t.best or {}
            row = {"trial": t.trial_id, **t.config, "groups": format_groups(groups[t.config["grouping"]])}
            row.update({key: best.get(key) for key in task_metric_keys(self.tasks, best)})
            row.update({self.metric: best.get(self.metric), "epochs": t.epochs, "hours": t.wall_s / 3600})
            row["chosen"] = "*" if t.trial_id == winner else ""
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "tasks": self.tasks,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "trials": self.rows(),
            "choice": dataclasses.asdict(self.choice) if self.choice else None,
            "best_model": self.best_model,
            "ensemble": self.ensemble,
            "cost_hours": {"search": self.search_s / 3600, "trials": self.trial_hours, "total": self.total_hours},
            "errors": {t.trial_id: t.error for t in self.trials if t.error},
        }


def task_metric_keys(tasks: Sequence[str], row: dict[str, Any]) -> list[str]:
    """`val/<task>/accuracy`, or micro_f1 for multilabel tasks: each task's primary metric."""
    from raymtl.train.report import primary_key

    return [primary_key(row, t) for t in tasks]


def best_by(items: Iterable[T], score: Callable[[T], float], mode: str) -> T:
    """The item with the best score (highest for mode "max", lowest for "min"); the first of equals."""
    return (max if mode == "max" else min)(items, key=score)


def choose(trials: Sequence[TrialRecord], metric: str, mode: str) -> Choice | None:
    """Best configuration by the metric averaged over its seeds; ties go to the earlier trial.

    A seed that failed (an error: a lost worker) is left out of its configuration's mean; one that
    trained an epoch and never scored a number (it diverged: NaN) rules its configuration out while
    another has none such: the mean of the seeds that survived would hide it.
    """
    def key(t: TrialRecord) -> str:
        return hashable({k: v for k, v in t.config.items() if k != "seed"})

    diverged = {key(t) for t in trials if t.error is None and t.epochs >= 1 and (t.best or {}).get(metric) is None}
    by_config: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.best is not None and t.best.get(metric) is not None:
            by_config.setdefault(key(t), []).append(t)
    if not by_config:
        return None

    def mean(members: list[TrialRecord]) -> float:
        return sum(t.best[metric] for t in members) / len(members)

    stable = [members for config, members in by_config.items() if config not in diverged]
    members = best_by(stable or by_config.values(), mean, mode)
    winner = best_by(members, lambda t: t.best[metric], mode)
    config = {k: v for k, v in winner.config.items() if k != "seed"}
    return Choice(config, mean(members), winner.trial_id, [t.trial_id for t in members])


def format_summary(result: SweepResult) -> str:
    """The comparison table (short column names), the choice and the cost."""
    from raymtl.train.metrics import summary_table
    from raymtl.train.report import SHORT_NAMES

    short = {f"val/{t}/{m}": f"{t} {abbr}" for t in result.tasks for m, abbr in SHORT_NAMES.items()}
    table = summary_table([{short.get(k, k): v for k, v in row.items()} for row in result.rows()])
    lines = [table, ""]
    if result.choice:
        c = result.choice
        members = f"{len(c.members)} member(s)"
        lines.append(f"chosen:      {json.dumps(c.config)}  {result.metric} {c.score:.4f} over {members}")
        lines.append(f"best model:  {result.best_model}")
    else:
        lines.append("chosen:      none (no trial finished an epoch)")
    if result.ensemble:
        e = result.ensemble
        lines.append(
            f"ensemble:    {e['split']} mean_score {e['mean_score']:.4f} (best member {e['best_member_score']:.4f} "
            f"on {e['split']}), {len(e['members'])} member(s) -> {e['model']}"
        )
    lines.append(
        f"cost:        {result.total_hours:.3f} trial-hours "
        f"({len(result.trials)} trials {result.trial_hours:.3f} h + search {result.search_s / 3600:.3f} h)"
    )
    tensorboard = f"tensorboard --logdir {storage.join(result.sweep_dir, 'tune')}"
    lines.append(f"sweep:       {result.sweep_dir}  ({tensorboard})")
    return "\n".join(lines)


def sweep_failure(result: SweepResult) -> str | None:
    """Why the sweep failed as a job (every trial errored, or none reported the metric), else None.

    Tune does not raise when trials fail, so this decides the exit status of `raymtl tune`: a failed
    sweep must fail its Ray job (a RayJob's backoffLimit then retries it, which resumes the errored trials).
    """
    failed = [t for t in result.trials if t.error]
    where = storage.join(result.sweep_dir, "summary.json")
    if result.trials and len(failed) == len(result.trials):
        lines = [line for line in failed[0].error.splitlines() if line.strip()] or ["?"]
        return f"all {len(failed)} trials failed (errors in {where}); {failed[0].trial_id}: {lines[-1].strip()}"
    if result.choice is None:
        return f"no trial reported {result.metric} ({len(failed)} of {len(result.trials)} failed; see {where})"
    return None


def write_summary(result: SweepResult) -> None:
    storage.write_text(storage.join(result.sweep_dir, "summary.json"), json.dumps(result.to_dict(), indent=2))
    rows = result.rows()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(result.sweep_dir, "summary.csv"), buffer.getvalue())
