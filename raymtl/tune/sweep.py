"""Sweeps with Ray Tune: task groupings, ensemble members (seeds) and hyperparameters, concurrently.

A sweep is the experiment's YAML plus a top-level `sweep:` section (`SweepSpec`). Every Tune trial
is one ordinary raymtl training (a `TorchTrainer` run, its own checkpoints and metrics.jsonl)
of the experiment with that trial's overrides; its per-epoch metrics reach Tune through
`TuneReportCallback`, so Tune schedulers, the progress table and TensorBoard see them.

With `groupings: search` the groupings come from data (TAG): one all-in-one training measures the
inter-task affinity Z (`training.affinity_every_steps`), `best_groupings` ranks the partitions of
the tasks by Z, and the best few train as trials beside the two baselines. Folder layout:

    <storage_path>/<name>-sweep/
      affinity/        the search run (affinity.json, affinity.png, metrics, checkpoints)
      candidates.json  the groupings trained, with their affinity scores
      runs/<trial>/    each trial's Train run: checkpoint_*/, metrics.jsonl, tensorboard/
      tune/            Tune's experiment: state for resume, a folder per trial with TensorBoard events
      summary.json, summary.csv, best_model/   the comparison, the choice and the chosen model
      ensemble_model/  with `ensemble: true`: the chosen configuration's members (seeds) as one model
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import posixpath
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from raymtl import storage
from raymtl.config import ConfigError, Experiment, read_config
from raymtl.convert import from_dict

if TYPE_CHECKING:  # torch comes with the functions that need it: `load_sweep` must stay light
    import torch

    from raymtl.data.task_info import TaskInfo
    from raymtl.tune.groupings import Grouping

CANDIDATES_FILE = "candidates.json"
SEARCH = "search"
# A trial's own process only waits on its Train run, whose workers reserve their own CPUs; a small
# share keeps Tune's placement group valid without starving Ray Data on a small box.
TRIAL_DRIVER_CPUS = 0.25
# Tune config key -> the SweepSpec field listing its values.
AXES = {
    "seed": "seeds",
    "backbone": "backbones",
    "lr": "lr",
    "batch_size": "batch_size",
    "sampler": "sampler",
    "temperature": "temperature",
}
TRAINING_KEYS = ("lr", "batch_size", "sampler", "temperature")


@dataclass
class Range:
    """A continuous range for a hyperparameter: sampled per trial (log-uniform unless `log: false`)."""

    min: float
    max: float
    log: bool = True


@dataclass
class AshaSpec:
    """Early stopping (ASHA) by epoch: trials below the top 1/reduction_factor stop at each rung."""

    max_t: int | None = None  # epochs; None = the experiment's epochs
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepSpec:
    """The `sweep:` section: what varies between trials and how they are compared."""

    # a list of {group: [tasks]}, "search", or None = the experiment's model.groups
    groupings: list[dict[str, list[str]]] | str | None = None
    max_groups: int = 2  # search: at most this many groups (backbones)
    top: int = 2  # search: train the `top` best-scoring groupings
    baselines: bool = True  # also train all-in-one-group and one-group-per-task
    seeds: list[int] | None = None  # ensemble members; None = the experiment's seed
    backbones: list[str] | None = None
    lr: list[float] | Range | None = None
    batch_size: list[int] | None = None
    sampler: list[str] | None = None
    temperature: list[float] | None = None
    num_samples: int = 1  # repeats of the grid (draws of the ranges)
    metric: str = "val/mean_score"
    mode: str = "max"
    asha: AshaSpec | None = None
    max_concurrent: int = 2
    affinity_epochs: int = 1  # search run length
    affinity_every_steps: int = 10  # search run: measure Z every N steps
    ensemble: bool = False  # also save the chosen configuration's members as one ensemble model

    def validate(self, exp: Experiment) -> "SweepSpec":
        """Every listed value is applied to `exp` and checked like a config, naming `sweep.<key>[i]`."""
        if isinstance(self.groupings, str) and self.groupings != SEARCH:
            raise ConfigError(
                f"sweep.groupings: expected a list of groupings or {SEARCH!r}, got {self.groupings!r}"
            )
        if self.mode not in ("min", "max"):
            raise ConfigError(f"sweep.mode: must be 'min' or 'max', got {self.mode!r}")
        counts = ("max_groups", "top", "num_samples", "max_concurrent", "affinity_epochs", "affinity_every_steps")
        for key in counts:
            if getattr(self, key) < 1:
                raise ConfigError(f"sweep.{key}: must be >= 1, got {getattr(self, key)}")
        _check_metric(self.metric, exp)
        if self.num_samples > 1 and not isinstance(self.lr, Range):
            raise ConfigError(
                "sweep.num_samples: repeats would be identical trials when nothing is sampled; "
                "list `seeds` for ensemble members, or give `lr` a {min, max} range"
            )
        _check_range(self.lr)
        _check_asha(self.asha)
        for field_name, _, values in self._listed():
            if not values:
                raise ConfigError(f"sweep.{field_name}: an empty list leaves nothing to train; leave the key out")
            if len(set(map(_hashable, values))) != len(values):
                raise ConfigError(f"sweep.{field_name}: duplicate values in {values}")
        for where, variant in self.variants(exp):
            try:
                variant.validate()
                if self.backbones and variant.model.image_backbone:
                    from raymtl.models.hub import check_image_backbone  # imports torchvision: only when listed

                    check_image_backbone(variant.model.image_backbone)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        return self

    def _listed(self) -> list[tuple[str, str, list]]:
        """(`sweep.` field, Tune config key, values) of every axis given as a list."""
        fields = {"grouping": "groupings", **AXES}
        return [(f, key, getattr(self, f)) for key, f in fields.items() if isinstance(getattr(self, f), list)]

    def variants(self, exp: Experiment) -> Iterator[tuple[str, Experiment]]:
        """(`sweep.<field>[i]`, exp with that one value applied) for every listed value."""
        for field_name, key, values in self._listed():
            for i, value in enumerate(values):
                yield f"sweep.{field_name}[{i}]", apply_config(exp, {key: value})


def _hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _check_metric(metric: str, exp: Experiment) -> None:
    parts = metric.split("/")
    if len(parts) == 3 and parts[0] == "val" and parts[1] not in exp.task_names:
        raise ConfigError(f"sweep.metric: {metric!r} names no task; tasks are {exp.task_names}")
    if not metric.startswith("val/"):
        raise ConfigError(f"sweep.metric: compare trials on a validation metric (val/...), got {metric!r}")


def _check_range(lr: Any) -> None:
    if isinstance(lr, Range) and not (0 < lr.min < lr.max if lr.log else lr.min < lr.max):
        raise ConfigError(f"sweep.lr: need {'0 < ' if lr.log else ''}min < max, got min={lr.min} max={lr.max}")
    if isinstance(lr, list) and any(v <= 0 for v in lr):
        raise ConfigError(f"sweep.lr: learning rates must be > 0, got {lr}")


def _check_asha(asha: AshaSpec | None) -> None:
    if asha is None:
        return
    if asha.grace_period < 1 or (asha.max_t is not None and asha.max_t < asha.grace_period):
        raise ConfigError(f"sweep.asha: need 1 <= grace_period <= max_t, got {asha}")
    if asha.reduction_factor <= 1:
        raise ConfigError(f"sweep.asha.reduction_factor: must be > 1, got {asha.reduction_factor}")


# ---------------------------------------------------------------- config


def load_sweep(path: str | Path) -> tuple[Experiment, SweepSpec]:
    """The experiment and its `sweep:` section from one YAML file, both checked before Ray starts."""
    raw = read_config(path)
    if "sweep" not in raw:
        raise ConfigError(f"{path}: a sweep config needs a top-level `sweep:` section")
    try:
        exp = from_dict(Experiment, {k: v for k, v in raw.items() if k != "sweep"}, "").validate()
        spec = from_dict(SweepSpec, raw["sweep"] or {}, "sweep").validate(exp)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return exp, spec


def apply_config(exp: Experiment, config: dict[str, Any]) -> Experiment:
    """`exp` with a trial's values (Tune config keys; "grouping" holds the {group: tasks} itself)."""
    training = dataclasses.replace(exp.training, **{k: config[k] for k in TRAINING_KEYS if k in config})
    model = exp.model
    if "grouping" in config:
        model = dataclasses.replace(model, groups=config["grouping"])
    if "backbone" in config:
        model = dataclasses.replace(model, image_backbone=config["backbone"])
    return dataclasses.replace(exp, seed=config.get("seed", exp.seed), model=model, training=training)


def trial_experiment(
    exp: Experiment,
    spec: SweepSpec,
    groupings: dict[str, Grouping],
    config: dict[str, Any],
    name: str,
    storage_path: str,
) -> Experiment:
    """The training a trial runs: its overrides, checkpoints kept by the sweep metric, its own run folder."""
    trial = apply_config(exp, {**config, "grouping": groupings[config["grouping"]]})
    training = dataclasses.replace(trial.training, checkpoint_metric=spec.metric, checkpoint_mode=spec.mode)
    return dataclasses.replace(trial, name=name, storage_path=storage_path, training=training).validate()


def param_space(spec: SweepSpec, grouping_names: Sequence[str]) -> dict[str, Any]:
    """Tune's search space: a grid over every listed value, ranges sampled (num_samples per grid point)."""
    from ray import tune

    space: dict[str, Any] = {"grouping": tune.grid_search(list(grouping_names))}
    for key, spec_field in AXES.items():
        values = getattr(spec, spec_field)
        if isinstance(values, Range):
            space[key] = (tune.loguniform if values.log else tune.uniform)(values.min, values.max)
        elif values is not None:
            space[key] = tune.grid_search(values)
    return space


def n_trials(space: dict[str, Any], num_samples: int) -> int:
    return num_samples * math.prod(len(v["grid_search"]) for v in space.values() if isinstance(v, dict))


# ---------------------------------------------------------------- groupings


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
            "(is sweep.affinity_every_steps larger than the steps it ran?)"
        )
    data = json.loads(storage.read_text(path))
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


# ---------------------------------------------------------------- results


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
    ensemble: dict[str, Any] | None = None  # model, members, validation metrics, mean_score, best member's

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


def best_row(history: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The epoch row with the best `metric` (the first of equals)."""
    rows = [r for r in history if r.get(metric) is not None]
    sign = 1 if mode == "max" else -1
    return max(rows, key=lambda r: sign * r[metric]) if rows else None


def choose(trials: Sequence[TrialRecord], metric: str, mode: str) -> Choice | None:
    """Best configuration by the metric averaged over its seeds; ties go to the earlier trial."""
    by_config: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.best is not None and t.best.get(metric) is not None:
            by_config.setdefault(_hashable({k: v for k, v in t.config.items() if k != "seed"}), []).append(t)
    if not by_config:
        return None
    sign = 1 if mode == "max" else -1

    def mean(members: list[TrialRecord]) -> float:
        return sum(t.best[metric] for t in members) / len(members)

    members = max(by_config.values(), key=lambda ms: sign * mean(ms))
    winner = max(members, key=lambda t: sign * t.best[metric])
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
    if result.ensemble:
        e = result.ensemble
        lines.append(
            f"ensemble:    val/mean_score {e['mean_score']:.4f} (best member {e['best_member_score']:.4f}), "
            f"{len(e['members'])} member(s) -> {e['model']}"
        )
    else:
        lines.append("chosen:      none (no trial finished an epoch)")
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


# ---------------------------------------------------------------- running


def sweep_dir_of(exp: Experiment) -> str:
    return storage.join(storage.normalize(exp.storage_path), f"{exp.name}-sweep")


def run_sweep(exp: Experiment, spec: SweepSpec, *, address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep; writes summary.json/csv and best_model/ in the sweep folder.

    Re-running the same sweep resumes it: the search result is reused, finished trials are kept,
    unfinished and failed ones continue from their latest checkpoint.
    """
    from raymtl.ray_runtime import ensure_ray
    from raymtl.train.trainer import check_schedule, prepare

    spec.validate(exp)
    exp, infos = prepare(exp)
    for where, variant in spec.variants(exp):
        try:
            check_schedule(variant, infos)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    ensure_ray(address)
    sweep_dir = sweep_dir_of(exp)
    found, search_s = _load_or_search(exp, spec, sweep_dir)
    grid = _run_trials(exp, spec, infos, found, sweep_dir)
    trials = [_record(r, storage.join(sweep_dir, "runs"), spec) for r in grid]
    trials.sort(key=lambda t: t.trial_id)
    choice = choose(trials, spec.metric, spec.mode)
    result = SweepResult(sweep_dir, spec.metric, exp.task_names, found, trials, choice, search_s)
    if result.choice:
        result.best_model = _copy_dir(_winner(result).checkpoint, storage.join(sweep_dir, "best_model"))
        if spec.ensemble:
            result.ensemble = _ensemble(result, exp, storage.join(sweep_dir, "ensemble_model"))
    write_summary(result)
    return result


def _winner(result: SweepResult) -> TrialRecord:
    return next(t for t in result.trials if t.trial_id == result.choice.trial_id)


def _ensemble(result: SweepResult, exp: Experiment, dest: str) -> dict[str, Any]:
    """The chosen configuration's members as one model at `dest` (replaced), and its validation metrics.

    The best member's are its best epoch's, from the same validation data and metric code.
    """
    from raymtl.evaluate import evaluate
    from raymtl.models.ensemble import build_ensemble

    members = [t for t in result.trials if t.trial_id in result.choice.members and t.checkpoint]
    fs, path = storage.resolve(dest)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:  # a resumed sweep rebuilds it
        fs.delete_dir(path)
    model = build_ensemble([t.checkpoint for t in members], dest)
    evaluation = evaluate(model, exp, split="validation")
    return {
        "model": model,
        "members": [t.trial_id for t in members],
        "metrics": evaluation.tasks,
        "mean_score": evaluation.mean_score,
        "best_member_score": _winner(result).best["val/mean_score"],
    }


def _load_or_search(exp: Experiment, spec: SweepSpec, sweep_dir: str) -> tuple[list[Candidate], float]:
    """The candidates (and the search's wall time), from candidates.json when a run already chose them."""
    path = storage.join(sweep_dir, CANDIDATES_FILE)
    if storage.exists(path):
        saved = json.loads(storage.read_text(path))
        return [Candidate(**c) for c in saved["candidates"]], saved["search_s"]
    affinity, search_s = None, 0.0
    if spec.groupings == SEARCH:
        start = time.monotonic()
        affinity = read_affinity(_affinity_run(exp, spec, sweep_dir))
        search_s = time.monotonic() - start
    found = candidates(exp, spec, affinity)
    saved = {"candidates": [dataclasses.asdict(c) for c in found], "search_s": search_s}
    storage.write_text(path, json.dumps(saved, indent=2))
    return found, search_s


def _affinity_run(exp: Experiment, spec: SweepSpec, sweep_dir: str) -> str:
    """Train the experiment as configured, all tasks in one group, measuring Z; returns its run folder."""
    from raymtl.train.trainer import fit

    training = dataclasses.replace(
        exp.training, epochs=spec.affinity_epochs, stages=[], affinity_every_steps=spec.affinity_every_steps
    )
    model = dataclasses.replace(exp.model, groups=None)
    search = dataclasses.replace(exp, name="affinity", storage_path=sweep_dir, model=model, training=training)
    return fit(search.validate()).run_dir


def _trial_dirname(trial) -> str:
    """Tune's folder for a trial is its id, the same name its Train run gets under runs/."""
    return trial.trial_id


def _train_trial(
    config: dict[str, Any], *, exp: Experiment, spec: SweepSpec, infos: dict[str, TaskInfo],
    groupings: dict[str, Grouping], runs_dir: str,
) -> None:
    """A Tune trial: one TorchTrainer run; its per-epoch reports go to Tune as they come."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymtl.train.trainer import make_trainer

    trial = trial_experiment(exp, spec, groupings, config, tune.get_context().get_trial_id(), runs_dir)
    make_trainer(trial, infos, {"callbacks": [TuneReportCallback()]}).fit()


def _run_trials(
    exp: Experiment, spec: SweepSpec, infos: dict[str, TaskInfo], found: list[Candidate], sweep_dir: str
):
    """Tune over the trials (a restored Tuner when the sweep already exists); returns Tune's ResultGrid."""
    from ray import tune

    groupings = {c.name: c.groups for c in found}
    runs_dir = storage.join(sweep_dir, "runs")
    trial_fn = tune.with_parameters(
        _train_trial, exp=exp, spec=spec, infos=infos, groupings=groupings, runs_dir=runs_dir
    )
    trainable = tune.with_resources(trial_fn, {"CPU": TRIAL_DRIVER_CPUS})
    tune_dir = storage.join(sweep_dir, "tune")
    if tune.Tuner.can_restore(tune_dir):
        return tune.Tuner.restore(tune_dir, trainable, resume_errored=True).fit()
    from raymtl import console
    from raymtl.tune.progress import TrialLines

    space = param_space(spec, list(groupings))
    total = n_trials(space, spec.num_samples)
    console.say(f"sweep: {total} trials, {spec.max_concurrent} at a time, in {sweep_dir}")
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, scheduler=scheduler(exp, spec), num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent, trial_dirname_creator=_trial_dirname,
        ),
        # Tune's status tables only with --verbose; by default one line per finished trial.
        run_config=tune.RunConfig(name="tune", storage_path=sweep_dir, callbacks=[TrialLines(spec.metric, total)],
                                  verbose=None if console.is_verbose() else 0),
    )
    return tuner.fit()


def scheduler(exp: Experiment, spec: SweepSpec):
    """ASHA by finished epochs (`max_t` defaults to the experiment's), or None: every trial runs to the end."""
    from ray.tune.schedulers import ASHAScheduler

    if spec.asha is None:
        return None
    max_t = spec.asha.max_t or sum(s.epochs for s in exp.training.stages) or exp.training.epochs
    return ASHAScheduler(
        time_attr="epoch", max_t=max_t, grace_period=spec.asha.grace_period,
        reduction_factor=spec.asha.reduction_factor,
    )


def _record(result, runs_dir: str, spec: SweepSpec) -> TrialRecord:
    """A trial's record from Tune's result and its Train run folder (metrics.jsonl, checkpoints)."""
    from raymtl.train.report import read_history

    trial_id = Path(result.path).name
    run_dir = storage.join(runs_dir, trial_id)
    history = read_history(run_dir)
    best = best_row(history, spec.metric, spec.mode)
    return TrialRecord(
        trial_id=trial_id,
        config=dict(result.config),
        wall_s=float((result.metrics or {}).get("time_total_s", 0.0)),
        best=best,
        epochs=len(history),
        checkpoint=_checkpoint_at(run_dir, best["global_step"]) if best else None,
        error=str(result.error) if result.error else None,
    )


def _checkpoint_at(run_dir: str, global_step: int) -> str | None:
    """The kept checkpoint written at the end of the epoch that reached `global_step`."""
    from ray.train import Result

    for checkpoint, metrics in Result.from_path(run_dir).best_checkpoints:
        if metrics.get("global_step") == global_step:
            return storage.join(run_dir, posixpath.basename(checkpoint.path))  # keeps a URI's scheme
    return None


def _copy_dir(src: str | None, dest: str) -> str | None:
    """Replace `dest` with a copy of the folder `src` (local or URI)."""
    if src is None:
        return None
    src_fs, src_path = storage.resolve(src)
    dest_fs, dest_path = storage.resolve(dest)
    dest_fs.delete_dir_contents(dest_path, missing_dir_ok=True)
    dest_fs.create_dir(dest_path, recursive=True)
    pafs.copy_files(src_path, dest_path, source_filesystem=src_fs, destination_filesystem=dest_fs)
    return storage.normalize(dest)
