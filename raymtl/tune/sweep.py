"""Sweeps with Ray Tune: task groupings, ensemble members (seeds) and hyperparameters, concurrently.

A sweep is the experiment's YAML plus a top-level `sweep:` section (`SweepSpec`). Every Tune trial
is one ordinary raymtl training of the experiment with that trial's overrides (its own checkpoints
and metrics.jsonl): a one-worker trial trains in the trial's own process, reserving just its worker
(`raymtl.tune.resources`), a larger one runs a `TorchTrainer`. The inputs are read (and cached)
once for all trials. Per-epoch metrics reach Tune as they come, so Tune schedulers, the progress
table and TensorBoard see them.

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

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymtl import storage
from raymtl.config import ConfigError, Experiment
from raymtl.tune.candidates import CANDIDATES_FILE, Candidate, candidates, read_affinity
from raymtl.tune.records import SweepResult, TrialRecord, choose, write_summary
from raymtl.tune.resources import (
    cluster_nodes, concurrency, show, trains_in_trial, trial_bundles, tune_resources, with_trial_gpus,
)
from raymtl.tune.spec import (
    SEARCH, SweepSpec, affinity_interval, apply_config, n_trials, param_space, trial_experiment,
)

if TYPE_CHECKING:
    from raymtl.data.task_info import TaskInfo
    from raymtl.train.recipes import Fit
    from raymtl.train.trainer import TrainResult
    from raymtl.tune.groupings import Grouping

def sweep_dir_of(exp: Experiment) -> str:
    return storage.join(storage.normalize(exp.storage_path), f"{exp.name}-sweep")


def run_sweep(exp: Experiment, spec: SweepSpec, *, address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep; writes summary.json/csv and best_model/ in the sweep folder.

    Re-running the same sweep resumes it: the search result is reused, finished trials are kept,
    unfinished and failed ones continue from their latest checkpoint.
    """
    from raymtl.models.multitask import check_module_names
    from raymtl.preflight import check_measured
    from raymtl.ray_runtime import ensure_ray
    from raymtl.train.trainer import check_schedule, prepare

    spec.validate(exp)
    exp, infos = prepare(exp)
    check_measured(spec.metric, infos, "sweep.metric")
    for where, variant in spec.variants(exp):
        try:
            check_module_names(variant.task_names, list(variant.task_groups()))  # a grouping's group names
            check_schedule(variant, infos)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    ensure_ray(address)
    sweep_dir = sweep_dir_of(exp)
    found, search_s = load_or_search(exp, spec, sweep_dir, address)
    grid = _run_trials(exp, spec, infos, found, sweep_dir, shared_inputs(exp, infos))
    trials = _records(grid, storage.join(sweep_dir, "runs"), spec)
    choice = choose(trials, spec.metric, spec.mode)
    result = SweepResult(sweep_dir, spec.metric, exp.task_names, found, trials, choice, search_s)
    if result.choice:
        result.best_model = storage.copy_dir(_winner(result).checkpoint, storage.join(sweep_dir, "best_model"))
        if spec.ensemble:
            result.ensemble = _ensemble(result, exp, storage.join(sweep_dir, "ensemble_model"))
    write_summary(result)
    return result


def _winner(result: SweepResult) -> TrialRecord:
    return next(t for t in result.trials if t.trial_id == result.choice.trial_id)


def _ensemble(result: SweepResult, exp: Experiment, dest: str) -> dict[str, Any]:
    """The chosen configuration's members as one model at `dest` (replaced), beside its best member.

    Both are scored on the test split when every task has one, else on validation. The best member
    is the one best on validation (`best_model`); on validation it also had its epoch picked there,
    an advantage the ensemble of several members lacks, so only the test split compares them fairly.
    """
    from raymtl.evaluate import evaluate
    from raymtl.models.ensemble import build_ensemble

    members = [t for t in result.trials if t.trial_id in result.choice.members and t.checkpoint]
    storage.remove_dir(dest)  # a resumed sweep rebuilds it
    model = build_ensemble([t.checkpoint for t in members], dest)
    split = "test" if all(t.test is not None for t in exp.tasks) else "validation"
    evaluation = evaluate(model, exp, split=split)
    return {
        "model": model,
        "members": [t.trial_id for t in members],
        "split": split,
        "metrics": evaluation.tasks,
        "mean_score": evaluation.mean_score,
        "best_member_score": evaluate(_winner(result).checkpoint, exp, split=split).mean_score,
    }


def load_or_search(
    exp: Experiment, spec: SweepSpec, sweep_dir: str, address: str | None = None
) -> tuple[list[Candidate], float]:
    """The candidates (and the search's wall time), from candidates.json when a run already chose them."""
    path = storage.join(sweep_dir, CANDIDATES_FILE)
    if storage.exists(path):
        saved = json.loads(storage.read_text(path))
        return [Candidate(**c) for c in saved["candidates"]], saved["search_s"]
    affinity, search_s = None, 0.0
    if spec.groupings == SEARCH:
        start = time.monotonic()
        affinity = read_affinity(_affinity_run(exp, spec, sweep_dir, address))
        search_s = time.monotonic() - start
    found = candidates(exp, spec, affinity)
    saved = {"candidates": [dataclasses.asdict(c) for c in found], "search_s": search_s}
    storage.write_text(path, json.dumps(saved, indent=2))
    return found, search_s


def _affinity_run(exp: Experiment, spec: SweepSpec, sweep_dir: str, address: str | None = None) -> str:
    """Train the experiment as configured, all tasks in one group, measuring Z; returns its run folder.

    It runs where the sweep runs: on the cluster of `address` (or RAY_ADDRESS, or the one this
    process joined), in this process only beside a local cluster the sweep started."""
    from raymtl.train.trainer import fit

    tr = exp.training
    every = spec.affinity_every_steps or affinity_interval(
        len(exp.tasks), tr.affinity_rows, tr.affinity_lookahead_rows, tr.batch_size, spec.affinity_share
    )
    training = dataclasses.replace(tr, epochs=spec.affinity_epochs, stages=[], affinity_every_steps=every)
    model = dataclasses.replace(exp.model, groups=None)
    search = dataclasses.replace(exp, name="affinity", storage_path=sweep_dir, model=model, training=training)
    return fit(search.validate(), address=address).run_dir


def shared_inputs(exp: Experiment, infos: dict[str, TaskInfo]):
    """The trials' inputs, read (and with `data.cache` decoded) once for the whole sweep.

    Every trial trains on the same tasks and `data` settings (a sweep varies groupings, seeds,
    backbones and optimisation, not the inputs), so one copy in the object store serves all of
    them, however many run at once; the cache is sized as for one run for that reason.
    """
    from raymtl.data.datasets import decoded_nbytes
    from raymtl.train.trainer import task_inputs

    return task_inputs(exp, infos, decoded_nbytes(exp, infos))


@contextlib.contextmanager
def _train_in_trial(to_tune: bool = True) -> Iterator[None]:
    """Ray Train's local mode inside a Tune trial, its reports also sent to Tune (`to_tune`).

    Ray Train refuses its own API (`ray.train.get_context`, `report`) in a function Tune runs:
    that guard is for code moved from Train into Tune. A local-mode run here is a Train run, so
    the guard is lifted for it; its reports go to Tune too, as `TuneReportCallback` sends a Train
    run's, so schedulers and the trial table see each one (not a staged recipe's part models').
    """
    import ray.train
    from ray import tune
    from ray.tune.trainable import trainable_fn_utils

    report, in_tune = ray.train.report, trainable_fn_utils._in_tune_session

    def both(metrics: dict, *args: Any, **kwargs: Any) -> None:
        report(metrics, *args, **kwargs)
        if to_tune:
            tune.report(dict(metrics))

    ray.train.report, trainable_fn_utils._in_tune_session = both, lambda: False
    try:
        yield
    finally:
        ray.train.report, trainable_fn_utils._in_tune_session = report, in_tune


def part_fit(trial: Experiment) -> Fit:
    """How a staged trial trains its part models: as the trial trains. A one-worker trial trains in
    its actor, holding its worker's CPUs and GPU share; a Train run for a part would wait for
    another such share, for ever on a sweep that fills the cluster's GPUs."""
    from raymtl.train.trainer import fit

    if not trains_in_trial(trial):
        return fit

    def in_trial(part: Experiment) -> TrainResult:
        with _train_in_trial(to_tune=False):
            return fit(part, here=True)

    return in_trial


def _trial_dirname(trial) -> str:
    """Tune's folder for a trial is its id, the same name its Train run gets under runs/."""
    return trial.trial_id


def _train_trial(
    config: dict[str, Any], *, exp: Experiment, spec: SweepSpec, infos: dict[str, TaskInfo],
    groupings: dict[str, Grouping], runs_dir: str, env: dict[str, str], inputs,
) -> None:
    """A Tune trial: its training in this process (one worker, `trains_in_trial`) or a TorchTrainer
    run; its reports go to Tune as they come. `inputs`: the sweep's, shared by every trial.

    `env`: the driver's `forwarded_env`, which this process (started before it was set) lacks.
    """
    from ray import tune

    from raymtl.train.recipes import train_parts
    from raymtl.train.trainer import fit_here, make_trainer

    os.environ.update(env)
    trial = trial_experiment(exp, spec, groupings, config, tune.get_context().get_trial_id(), runs_dir)
    if trial.training.recipe == "staged":  # the part models train first, reporting nothing to Tune
        trial = train_parts(trial, part_fit(trial))
    if trains_in_trial(trial):
        with _train_in_trial():
            fit_here(trial, infos, inputs)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    make_trainer(trial, infos, {"callbacks": [TuneReportCallback()]}, inputs=inputs).fit()


def _run_trials(
    exp: Experiment, spec: SweepSpec, infos: dict[str, TaskInfo], found: list[Candidate], sweep_dir: str, inputs=None
):
    """Tune over the trials (a restored Tuner when the sweep already exists); returns Tune's ResultGrid.

    Each trial reserves what it uses (`raymtl.tune.resources`); a trial the cluster can never hold
    fails here, before Tune starts."""
    from ray import tune

    from raymtl.train.trainer import forwarded_env

    exp = with_trial_gpus(exp, spec.gpus_per_trial)
    fitting = concurrency(trial_bundles(exp), cluster_nodes())
    groupings = {c.name: c.groups for c in found}
    runs_dir = storage.join(sweep_dir, "runs")
    trial_fn = tune.with_parameters(
        _train_trial, exp=exp, spec=spec, infos=infos, groupings=groupings, runs_dir=runs_dir, env=forwarded_env(),
        inputs=inputs,
    )
    trainable = tune.with_resources(trial_fn, tune_resources(exp))
    tune_dir = storage.join(sweep_dir, "tune")
    if tune.Tuner.can_restore(tune_dir):
        return tune.Tuner.restore(tune_dir, trainable, resume_errored=True).fit()
    from raymtl import console
    from raymtl.tune.progress import TrialLines

    space = param_space(spec, list(groupings), exp.seed)
    total = n_trials(space)
    at_once = min(spec.max_concurrent or fitting, total)
    console.say(f"sweep: {total} trials, {at_once} at a time ({show(tune_resources(exp))} each), in {sweep_dir}")
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, scheduler=scheduler(exp, spec),
            max_concurrent_trials=at_once, trial_dirname_creator=_trial_dirname,
        ),
        # Tune's status tables only with --verbose; by default one line per finished trial.
        run_config=tune.RunConfig(name="tune", storage_path=sweep_dir, callbacks=[TrialLines(spec.metric, total)],
                                  verbose=None if console.is_verbose() else 0),
    )
    return tuner.fit()


def scheduler(exp: Experiment, spec: SweepSpec):
    """ASHA by finished epochs (`max_t` defaults to the longest trial's), or None: every trial runs to the end."""
    from ray.tune.schedulers import ASHAScheduler

    from raymtl.train.recipes import reported_epochs

    if spec.asha is None:
        return None
    max_t = spec.asha.max_t or max(reported_epochs(apply_config(exp, {"recipe": recipe}))
                                   for recipe in spec.recipes or [exp.training.recipe])
    return ASHAScheduler(
        time_attr="epoch", max_t=max_t, grace_period=spec.asha.grace_period,
        reduction_factor=spec.asha.reduction_factor,
    )


def _records(grid, runs_dir: str, spec: SweepSpec) -> list[TrialRecord]:
    """Every trial's record, by trial id: its best and last epoch as Tune saw them, and the checkpoint
    its Train run kept for the best."""
    records = []
    for result in grid:
        trial_id = Path(result.path).name  # the trial's folder is its id (`_trial_dirname`)
        row = _best_row(result.metrics_dataframe, spec.metric, spec.mode)
        # A mid-epoch checkpoint reports a worst-possible score; before the first epoch ends (epoch 0) no best epoch.
        row = row if row and row.get("epoch", 0) >= 1 else None
        run_dir = storage.join(runs_dir, trial_id)
        records.append(TrialRecord(
            trial_id=trial_id,
            config=dict(result.config),
            wall_s=float((result.metrics or {}).get("time_total_s", 0.0)),
            best=row,
            epochs=int((result.metrics or {}).get("epoch", 0)),
            checkpoint=_best_checkpoint(run_dir, spec) if row else None,
            error=str(result.error) if result.error else None,
        ))
    return sorted(records, key=lambda t: t.trial_id)


def _best_row(frame, metric: str, mode: str) -> dict[str, Any] | None:
    """A trial's report best by `metric` (the first of equals), as plain Python values, missing ones left
    out; None when no report has a number for it (a trial that diverged: NaN at every epoch, which
    Tune's own `get_dataframe(filter_metric=...)` fails on, for the whole sweep)."""
    import pandas as pd

    if frame is None or metric not in frame:
        return None
    scores = pd.to_numeric(frame[metric], errors="coerce")
    if not scores.notna().any():
        return None
    row = frame.loc[scores.idxmax() if mode == "max" else scores.idxmin()]
    plain = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
    return {k: v for k, v in plain.items() if not (isinstance(v, float) and math.isnan(v))}


def _best_checkpoint(run_dir: str, spec: SweepSpec) -> str | None:
    """The trial's kept checkpoint best by the sweep metric: the trial's checkpoints are ranked by it."""
    from ray.train import Result

    from raymtl.train.in_process import Retention
    from raymtl.train.trainer import best_checkpoint

    if not storage.is_uri(run_dir):  # a local folder: its checkpoints carry their metrics (in-trial runs too)
        return Retention(1, spec.metric, spec.mode).best(run_dir)
    return best_checkpoint(Result.from_path(run_dir), spec.metric, spec.mode, run_dir)
