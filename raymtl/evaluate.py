"""`raymtl evaluate`: per-task metrics of a saved model (or an ensemble) on labelled per-task data.

Each task of a training config is read from its `validation:` (or `test:`) source and runs through
prediction's Ray Data stages (`raymtl.predict`: the training `Preprocessor` on CPU actors, the
model in a pool of actors) with its labels encoded alongside; the driver feeds the probabilities
into the training metric code (`make_accumulator`), so the numbers are the ones training reports
on the same rows (an empty text is scored as training's validation scores it; prediction flags it).
Every task's rows go through one stream, tagged with their task (`tagged`): one start of the
actors however many tasks, and a batch may hold rows of several. The tasks' tables differ in
columns and types, and their decoded arrays and probabilities in shapes, so a row travels pickled
between the stages (`_PrepareEach`, `_ScoreEach`) and each stage runs each task's rows as that
task's own stage would.

The loss is the negative log-likelihood of the predicted probabilities (cross-entropy or BCE,
without label smoothing or task weight), an ensemble's of its averaged probabilities, computed in
float64 from them (a probability of 0 costs -log of the dtype's smallest positive value, 103.3 in
float32; a multilabel probability rounded to 1 leaves 1 - p at half float32's step below 1, 17.3).
For one model it is training's val/<task>/loss as far as float32 probabilities keep it: exact to float
precision for likely labels, less so for a multilabel false positive of probability near 1, whose
1 - p float32 keeps to a few digits (a logit of 15: 14.84 against 15.00), and the least loss they
stand for where they underflow or round to 1.
Rows whose image cannot be read are left out and counted; a task none of whose rows could be read
is named, its metrics NaN, and left out of the mean score and Δ%.

`modality`: "image" (image only: the text masked), "text" (text only: the image masked) or "both".
A masked modality is not computed and feeds zeros into its fusion slot (after the per-modality
normalisation), exactly what a task without that modality feeds, and what modality dropout trains
the model on; a task whose only modality is masked then predicts from zeros: its prior.

A split of at most `raymtl.predict.LOCAL_ROWS` rows is scored by the same two stages in this
process (no Ray cluster is started when every task's is): the actors' start-up, seconds, would
cost more than its rows; not when the actors would have GPUs this process lacks.

With baselines, each task is compared with the baselines that predict it (several: their mean)
and LibMTL's Δ% sums it up: the mean over tasks of the mean over the task's metrics of
±(model - baseline) / baseline, signed so that higher is better (the loss counts negated), x 100.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pickle
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

import raymtl.predict
from raymtl import console, storage
from raymtl.config import ConfigError, Experiment, TaskSpec, load_experiment
from raymtl.predict import gpus_per_actor, local_choice, predictions, stages_here
from raymtl.predict.actors import Predict, Prepare, masked_inputs
from raymtl.predict.plan import LABEL, Plan, make_plan
from raymtl.predict.reading import items_here, read_items
from raymtl.train.metrics import summary_table
from raymtl.train.report import primary_metric

SPLITS = {"validation": "validation", "test": "test"}  # --split -> TaskSpec field
LOWER_IS_BETTER = frozenset({"loss"})
COUNTS = ("rows", "bad_rows")  # reported beside the metrics, not compared
MASKED = {"both": None, "image": "text", "text": "image"}  # modality evaluated -> modality masked
TASK, ROW = "task", "row"  # the columns of the stream of every task: the task's index, the row pickled


@dataclass
class Evaluation:
    """One model's metrics on one split: task -> metric -> value (plus the row counts)."""

    model: str
    split: str
    tasks: dict[str, dict[str, float]]
    seconds: float = 0.0
    modality: str = "both"  # both | image (text masked) | text (image masked)

    @property
    def unmeasured(self) -> list[str]:
        """The tasks none of whose rows could be read: their metrics are NaN."""
        return [task for task, m in self.tasks.items() if np.isnan(m[primary_metric(m)])]

    @property
    def mean_score(self) -> float:
        """The mean of the tasks' primary metrics, as `val/mean_score` in training, over the tasks
        measured (NaN when none was)."""
        scores = [m[primary_metric(m)] for m in self.tasks.values()]
        return _mean([score for score in scores if not np.isnan(score)])


@dataclass
class Comparison:
    """Per-task metric deltas against the baselines and LibMTL's Δ% (higher is better)."""

    baselines: list[str]
    deltas: dict[str, dict[str, float]]  # task -> metric -> model - baseline
    delta_percent: float
    per_task_percent: dict[str, float] = field(default_factory=dict)
    unmeasured: list[str] = field(default_factory=list)  # left out of Δ%: no row read by the model or its baselines
    zero_references: dict[str, list[str]] = field(default_factory=dict)  # task -> metrics of reference 0: no gain


def evaluate(
    model_path: str,
    config: str | Experiment,
    *,
    split: str = "validation",
    tasks: list[str] | None = None,
    batch_size: int = 64,
    pool_size: int = 1,
    num_gpus: float | None = None,
    address: str | None = None,
    local: bool | None = None,
    modality: str = "both",
) -> Evaluation:
    """Metrics of every task of `config` (a YAML path or an Experiment) that the model predicts.

    With `tasks` only those; without, a config task the model lacks is skipped, and a model with
    none of the config's tasks is a ConfigError, as is a task without the split's source or with a
    label the model does not know. `local`: the same two stages in this process (on its GPU if it
    has one) instead of on Ray Data's actors; None: for a task whose split has at most
    `raymtl.predict.LOCAL_ROWS` rows, unless `num_gpus` or `address` asks for Ray's actors or they
    would have GPUs this process lacks (`raymtl.predict.actors_have_gpus`).
    """
    from raymtl.models.artifact import load
    from raymtl.ray_runtime import ensure_ray

    if modality not in MASKED:
        raise ConfigError(f"unknown modality {modality!r}; choose one of {', '.join(MASKED)}")
    local = local_choice(local, {"num_gpus": num_gpus, "address": address})
    exp = config if isinstance(config, Experiment) else load_experiment(config)
    saved = load(model_path)
    rows = _task_rows(exp, saved.infos, split, tasks)
    if local is None and raymtl.predict.actors_have_gpus():
        local = False
    most = raymtl.predict.LOCAL_ROWS
    here = {task: n <= most if local is None else local for task, n in rows.items()}
    if local is None and any(here.values()):
        console.say(f"[raymtl] {sum(here.values())} of {len(here)} task(s) with at most {most} rows: scored in this "
                    "process (--no-local: on Ray Data's actors)")
    if not all(here.values()):
        ensure_ray(address)
        gpus = gpus_per_actor(num_gpus)
    start = time.perf_counter()
    scores = {task: TaskScore(saved.infos[task]) for task in rows}
    for in_process in (True, False):
        names = [task for task in rows if here[task] == in_process]
        if not names:
            continue
        plans = [_plan(model_path, saved, exp.task(task), modality) for task in names]
        sources = [getattr(exp.task(task), SPLITS[split]) for task in names]
        if in_process:
            items = pd.concat([tagged(items_here(source, plan, None), k)
                               for k, (source, plan) in enumerate(zip(sources, plans))], ignore_index=True)
            scored = stages_here(items, plans, batch_size, _ScoreEach, saved, prepare_stage=_PrepareEach)
        else:
            streams = [read_items(source, plan).map_batches(tagged, fn_args=(k,), batch_format="pandas")
                       for k, (source, plan) in enumerate(zip(sources, plans))]
            pipeline = predictions(streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0], plans,
                                   batch_size, pool_size, gpus, model_stage=_ScoreEach, prepare_stage=_PrepareEach,
                                   rows=sum(rows[task] for task in names))
            scored = pipeline.iter_batches(batch_format="numpy")
        for batch in scored:
            for k, arrays in by_task(batch).items():
                scores[names[k]].update(arrays)
    metrics = {task: score.metrics() for task, score in scores.items()}
    return Evaluation(storage.normalize(model_path), split, metrics, time.perf_counter() - start, modality)


def check_models(exp: Experiment, model_path: str, baselines: list[str], tasks: list[str] | None) -> list[list[str]]:
    """Each baseline's tasks to score: the evaluated ones it predicts (single-task baselines of a multi-task
    model). From the meta files (no weights), before anything is scored: a mistyped path, a baseline that
    predicts none of those tasks or a task no baseline predicts is a ConfigError in a second, not a failure
    after the scoring."""
    evaluated = [spec.name for spec in _selected(exp, model_tasks(model_path), tasks)]
    shares = []
    for path in baselines:
        predicted = model_tasks(path)
        shares.append([task for task in evaluated if task in predicted])
        if not shares[-1]:
            raise ConfigError(f"baseline {path!r} predicts none of the evaluated tasks {evaluated}; "
                              f"its tasks are {predicted}")
    uncovered = [task for task in evaluated if not any(task in share for share in shares)]
    if baselines and uncovered:
        raise ConfigError(f"no baseline predicts task {uncovered[0]!r}; baselines: {baselines}")
    return shares


def model_tasks(path: str) -> list[str]:
    """The tasks a saved model or ensemble predicts, from its meta file; a path that is no saved model is a
    ConfigError naming it."""
    from raymtl.models.artifact import read_meta_at

    return list(read_meta_at(path)["tasks"])


def _plan(model_path: str, saved: Any, spec: TaskSpec, modality: str) -> Plan:
    """The prediction plan of one task's split: its columns, its labels encoded, a modality masked."""
    plan = make_plan(model_path, saved, tasks=[spec.name], image_column=spec.image_column,
                     text_column=spec.text_column, id_column=_row_id(spec), label_column=spec.label_column)
    return dataclasses.replace(plan, masked=MASKED[modality], empty_text_is_bad=False)  # scored as "", as training


def _task_rows(exp: Experiment, infos: dict, split: str, tasks: list[str] | None) -> dict[str, int]:
    """The config's tasks to evaluate and their split's rows, checked against the model and the data
    before Ray starts."""
    from raymtl.data.inspection import inspect_tasks

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    specs = _selected(exp, list(infos), tasks)
    for spec in specs:
        if getattr(spec, SPLITS[split]) is None:
            raise ConfigError(f"task {spec.name!r} has no `{SPLITS[split]}:` source to evaluate on")
    found = inspect_tasks(Experiment(exp.name, specs, data=exp.data))  # files, columns, labels
    for spec in specs:
        unknown = sorted(set(found[spec.name].labels) - set(infos[spec.name].labels))
        if unknown:
            raise ConfigError(
                f"task {spec.name!r}: label {unknown[0]!r} of the data is not in the model's label map "
                f"{infos[spec.name].labels[:20]}"
            )
    return {spec.name: found[spec.name].n_val if split == "validation" else found[spec.name].n_test for spec in specs}


def _selected(exp: Experiment, predicted: list[str], tasks: list[str] | None) -> list[TaskSpec]:
    """The config's tasks to evaluate: `tasks`, each of which the model must predict, else those it predicts."""
    for name in tasks or []:
        exp.task(name)  # names the unknown task
        if name not in predicted:
            raise ConfigError(f"the model has no task {name!r}; its tasks are {predicted}")
    specs = [t for t in exp.tasks if (t.name in tasks if tasks else t.name in predicted)]
    if not specs:
        raise ConfigError(f"the model predicts none of the config's tasks {exp.task_names}; its tasks are {predicted}")
    return specs


def _row_id(spec: TaskSpec) -> str | None:
    """What names a row in an error: the id column, else the image path."""
    return spec.id_column or spec.image_column


# ---------------------------------------------------------------- the stream of every task


def tagged(items: pd.DataFrame, task: int) -> pd.DataFrame:
    """The rows of the stream's `task`-th task: its index, and each row pickled (whatever its columns)."""
    return pd.DataFrame({TASK: np.full(len(items), task, np.int32),
                         ROW: [pickle.dumps(row, protocol=5) for row in items.to_dict("records")]})


class _PrepareEach:
    """Decoding actor of an evaluation: each task's rows of a batch through that task's `Prepare`,
    every row's arrays (inputs, label, errors) pickled."""

    def __init__(self, plans: list[Plan]) -> None:
        self.prepares = [Prepare(plan) for plan in plans]

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        tasks = batch[TASK].to_numpy()
        return _by_row(tasks, {k: self.prepares[k](pd.DataFrame([pickle.loads(r) for r in rows]))
                               for k, rows in _rows_by_task(tasks, batch[ROW].to_numpy()).items()})


class _ScoreEach(Predict):
    """Model actor of an evaluation: per row the probabilities of its task, its label and whether it
    is bad (pickled); the model loaded once for every task."""

    def __init__(self, plans: list[Plan], use_gpu: bool, saved: Any = None) -> None:
        super().__init__(plans[0], use_gpu, saved)  # the plans differ in their task and columns only
        self.heads, self.task_heads = (), [plan.heads for plan in plans]  # a row's heads are its task's
        self.task_masked = [masked_inputs(plan) for plan in plans]  # each plan numbers its own inputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scored = {}
        for k, arrays in by_task(batch).items():
            ((probs, bad),) = self.probabilities(arrays, self.task_heads[k], self.task_masked[k])
            scored[k] = {"probs": probs, LABEL: arrays[LABEL], "bad": bad}
        return _by_row(batch[TASK], scored)


def by_task(batch: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """A batch of the stream as each task's arrays (the rows of a task stacked, in batch order)."""
    out = {}
    for k, rows in _rows_by_task(batch[TASK], batch[ROW]).items():
        rows = [pickle.loads(r) for r in rows]
        out[k] = {key: _stack([row[key] for row in rows]) for key in rows[0]}
    return out


def _rows_by_task(tasks: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    return {int(k): rows[tasks == k] for k in np.unique(tasks)}


def _by_row(tasks: np.ndarray, arrays: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each task's arrays back as the stream's rows (task, pickled row), in the batch's order."""
    rows = np.empty(len(tasks), dtype=object)
    for k, values in arrays.items():
        rows[tasks == k] = [pickle.dumps(dict(zip(values, row)), protocol=5) for row in zip(*values.values())]
    return {TASK: np.asarray(tasks, np.int32), ROW: rows}


def _stack(values: list) -> np.ndarray:
    return np.array(values, dtype=object) if isinstance(values[0], str) or values[0] is None else np.stack(values)


class TaskScore:
    """The training metrics of one task, fed batches of {"probs", "label", "bad"} numpy arrays.

    The decisions (argmax, probability > threshold) are prediction's, and the loss is the NLL of
    the probabilities (`likelihood_loss_sum`): an ensemble's, of its averaged probabilities.
    """

    def __init__(self, info: Any) -> None:
        from raymtl.train.metrics import make_accumulator

        self.info = info
        self.accumulator = make_accumulator(info, info.threshold)
        self.rows = self.bad_rows = 0

    def update(self, batch: dict[str, np.ndarray]) -> None:
        import torch

        from raymtl.train.losses import likelihood_loss_sum

        good = ~batch["bad"]
        self.rows, self.bad_rows = self.rows + len(good), self.bad_rows + int((~good).sum())
        if good.any():
            probs, target = batch["probs"][good], batch[LABEL][good]
            loss_sum = likelihood_loss_sum(probs, target, self.info.kind)
            self.accumulator.update(torch.as_tensor(probs), torch.as_tensor(target), loss_sum)

    def metrics(self) -> dict[str, float]:
        return {**self.accumulator.compute(), "rows": self.rows, "bad_rows": self.bad_rows}


# ---------------------------------------------------------------- comparing


def compare(evaluation: Evaluation, baselines: list[Evaluation]) -> Comparison:
    """Deltas and Δ% of `evaluation` against the baselines; every task needs a baseline that has it.

    A task's reference is the mean of the baselines that read a row of it; a task the model read no
    row of, or none of its baselines did, is left out of Δ% and named. A metric whose reference is 0
    has no relative gain: it is left out of its task's mean and named (`zero_references`)."""
    deltas, percent, unread, zero = {}, {}, [], {}
    model_unread = set(evaluation.unmeasured)
    read_by = [(b, set(b.tasks) - set(b.unmeasured)) for b in baselines]  # the tasks each baseline read rows of
    for task, metrics in evaluation.tasks.items():
        if not any(task in b.tasks for b in baselines):
            raise ConfigError(f"no baseline predicts task {task!r}; baselines: {[b.model for b in baselines]}")
        refs = [b.tasks[task] for b, read in read_by if task in read]
        names = [m for m in metrics if m not in COUNTS]
        if task in model_unread or not refs:
            unread.append(task)
            deltas[task], percent[task] = dict.fromkeys(names, math.nan), math.nan
            continue
        reference = {m: float(np.mean([r[m] for r in refs])) for m in names}
        deltas[task] = {m: metrics[m] - reference[m] for m in names}
        zero[task] = [m for m in names if not reference[m]]
        percent[task] = _mean([relative_gain(m, metrics[m], reference[m]) for m in names if reference[m]])
    measured = [p for p in percent.values() if not math.isnan(p)]  # an unread task's is NaN
    return Comparison([b.model for b in baselines], deltas, 100 * _mean(measured),
                      {t: 100 * p for t, p in percent.items()}, unread, {t: m for t, m in zero.items() if m})


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def relative_gain(metric: str, value: float, baseline: float) -> float:
    """(value - baseline) / baseline, negated for a metric where lower is better (baseline != 0)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return sign * (value - baseline) / baseline


# ---------------------------------------------------------------- output


def format_table(evaluation: Evaluation, comparison: Comparison | None = None) -> str:
    """One row per task: its metrics, and with a comparison the primary metric's delta and Δ%."""
    rows = []
    for task, metrics in evaluation.tasks.items():
        row = {"task": task, **metrics}
        if comparison:
            primary = primary_metric(metrics)
            row[f"Δ {primary}"] = comparison.deltas[task][primary]
            row["Δ%"] = comparison.per_task_percent[task]
        rows.append(row)
    lines = [summary_table(rows), "", f"mean score: {evaluation.mean_score:.4f}  ({evaluation.split})"]
    if comparison:
        left_out = f"  (without {_tasks(comparison.unmeasured)}: no readable rows)" if comparison.unmeasured else ""
        lines.append(f"Δ% vs {', '.join(comparison.baselines)}: {comparison.delta_percent:+.2f}{left_out}")
        if comparison.zero_references:
            named = "; ".join(f"{t}: {', '.join(m)}" for t, m in comparison.zero_references.items())
            lines.append(f"note: metrics whose baseline is 0 have no relative gain, left out of Δ% ({named})")
    if evaluation.unmeasured:
        lines.append(f"warning: no readable rows in {_tasks(evaluation.unmeasured)}: left out of the mean score")
    return "\n".join(lines)


def _tasks(names: list[str]) -> str:
    return f"task{'s' if len(names) > 1 else ''} {', '.join(names)}"


def modality_table(by_modality: dict[str, Evaluation]) -> str:
    """One row per task: its primary metric with both modalities, image only and text only."""
    first = next(iter(by_modality.values()))
    rows = []
    for task, metrics in first.tasks.items():
        primary = primary_metric(metrics)
        rows.append({"task": task, "metric": primary,
                     **{m: e.tasks[task][primary] for m, e in by_modality.items()}})
    rows.append({"task": "mean", "metric": "score", **{m: e.mean_score for m, e in by_modality.items()}})
    return summary_table(rows)


def write_results(out: str, evaluation: Evaluation, baselines: list[Evaluation], comparison: Comparison | None,
                  by_modality: dict[str, Evaluation] | None = None) -> None:
    """evaluation.json (everything) and evaluation.csv (one row per model and task) in `out`."""
    report: dict[str, Any] = {**_summary(evaluation), "baselines": [_summary(b) for b in baselines],
                              "comparison": asdict(comparison) if comparison else None}
    if by_modality:
        report["by_modality"] = {m: _summary(e) for m, e in by_modality.items()}
    storage.write_text(storage.join(out, "evaluation.json"), json.dumps(_json_safe(report), indent=2, allow_nan=False))
    rows = [{"model": e.model, "task": task, **metrics} for e in (evaluation, *baselines)
            for task, metrics in e.tasks.items()]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(out, "evaluation.csv"), buffer.getvalue())


def _json_safe(value: Any) -> Any:
    """`value` with every NaN as None: strict JSON (what a browser or jq reads) has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _summary(evaluation: Evaluation) -> dict[str, Any]:
    """An evaluation's fields, its mean score and the tasks it left out of it (none of their rows read)."""
    return {**asdict(evaluation), "mean_score": evaluation.mean_score, "unmeasured": evaluation.unmeasured}
