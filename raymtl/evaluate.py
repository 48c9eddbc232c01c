"""`raymtl evaluate`: per-task metrics of a saved model (or an ensemble) on labelled per-task data.

Each task of a training config is read from its `validation:` (or `test:`) source and runs through
prediction's Ray Data stages (`raymtl.predict`: the training `Preprocessor` on CPU actors, the
model in a pool of actors) with its labels encoded alongside; the driver feeds the probabilities
into the training metric code (`make_accumulator`), so the numbers are the ones training reports.

The loss is the negative log-likelihood of the predicted probabilities (cross-entropy or BCE,
without label smoothing or task weight). Rows whose image cannot be read are left out and counted.

`modality`: "image" (image only: the text masked), "text" (text only: the image masked) or "both".
A masked modality is not computed and feeds zeros into its fusion slot (after the per-modality
normalisation), exactly what a task without that modality feeds, and what modality dropout trains
the model on; a task whose only modality is masked then predicts from zeros: its prior.

A split of at most `raymtl.predict.LOCAL_ROWS` rows is scored by the same two stages in this
process (no Ray cluster is started when every task's is): the actors' start-up, seconds per task,
would cost more than its rows; not when the actors would have GPUs this process lacks.

With baselines, each task is compared with the baselines that predict it (several: their mean)
and LibMTL's Δ% sums it up: the mean over tasks of the mean over the task's metrics of
±(model - baseline) / baseline, signed so that higher is better (the loss counts negated), x 100.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import raymtl.predict
from raymtl import console, storage
from raymtl.config import ConfigError, Experiment, TaskSpec, load_experiment
from raymtl.predict import gpus_per_actor, local_choice, predictions, stages_here
from raymtl.predict.actors import Predict
from raymtl.predict.plan import LABEL, make_plan
from raymtl.predict.reading import items_here, read_items
from raymtl.train.metrics import summary_table
from raymtl.train.report import primary_metric

SPLITS = {"validation": "validation", "test": "test"}  # --split -> TaskSpec field
LOWER_IS_BETTER = frozenset({"loss"})
COUNTS = ("rows", "bad_rows")  # reported beside the metrics, not compared
MASKED = {"both": None, "image": "text", "text": "image"}  # modality evaluated -> modality masked


@dataclass
class Evaluation:
    """One model's metrics on one split: task -> metric -> value (plus the row counts)."""

    model: str
    split: str
    tasks: dict[str, dict[str, float]]
    seconds: float = 0.0
    modality: str = "both"  # both | image (text masked) | text (image masked)

    @property
    def mean_score(self) -> float:
        """The mean of the tasks' primary metrics, as `val/mean_score` in training."""
        return float(np.mean([m[primary_metric(m)] for m in self.tasks.values()]))


@dataclass
class Comparison:
    """Per-task metric deltas against the baselines and LibMTL's Δ% (higher is better)."""

    baselines: list[str]
    deltas: dict[str, dict[str, float]]  # task -> metric -> model - baseline
    delta_percent: float
    per_task_percent: dict[str, float] = field(default_factory=dict)


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
    metrics = {}
    for spec in (exp.task(task) for task in rows):
        plan = make_plan(model_path, saved, tasks=[spec.name], image_column=spec.image_column,
                         text_column=spec.text_column, id_column=_row_id(spec), label_column=spec.label_column)
        plan = dataclasses.replace(plan, masked=MASKED[modality])
        source = getattr(spec, SPLITS[split])
        if here[spec.name]:
            scored = stages_here(items_here(source, plan, None), plan, batch_size, _Score, saved)
        else:
            pipeline = predictions(read_items(source, plan), plan, batch_size, pool_size, gpus, model_stage=_Score)
            scored = pipeline.iter_batches(batch_format="numpy")
        metrics[spec.name] = task_metrics(saved.infos[spec.name], scored)
    return Evaluation(storage.normalize(model_path), split, metrics, time.perf_counter() - start, modality)


def _task_rows(exp: Experiment, infos: dict, split: str, tasks: list[str] | None) -> dict[str, int]:
    """The config's tasks to evaluate and their split's rows, checked against the model and the data
    before Ray starts."""
    from raymtl.data.inspection import inspect_tasks

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    for name in tasks or []:
        exp.task(name)  # names the unknown task
        if name not in infos:
            raise ConfigError(f"the model has no task {name!r}; its tasks are {list(infos)}")
    specs = [t for t in exp.tasks if (t.name in tasks if tasks else t.name in infos)]
    if not specs:
        raise ConfigError(f"the model predicts none of the config's tasks {exp.task_names}; its tasks are {list(infos)}")
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


def _row_id(spec: TaskSpec) -> str | None:
    """What names a row in an error: the id column, else the image path."""
    return spec.id_column or spec.image_column


class _Score(Predict):
    """Model actor of an evaluation: per row the probabilities of the plan's task, its label, badness."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ((probs, bad),) = self.probabilities(batch)
        return {"probs": probs, LABEL: batch[LABEL], "bad": bad}


def task_metrics(info, batches) -> dict[str, float]:
    """The training metrics of one task from batches of {"probs", "label", "bad"} numpy arrays."""
    import torch

    from raymtl.models.ensemble import as_logits
    from raymtl.train.losses import task_loss
    from raymtl.train.metrics import make_accumulator

    accumulator = make_accumulator(info, info.threshold)
    loss = task_loss(TaskSpec(info.name, train=None, kind=info.kind), info)
    rows = bad_rows = 0
    for batch in batches:
        good = ~batch["bad"]
        rows, bad_rows = rows + len(good), bad_rows + int((~good).sum())
        if good.any():
            logits = as_logits(torch.as_tensor(batch["probs"][good]), info.kind)
            target = torch.as_tensor(batch[LABEL][good])
            accumulator.update(logits, target, loss(logits, target) * int(good.sum()))
    return {**accumulator.compute(), "rows": rows, "bad_rows": bad_rows}


# ---------------------------------------------------------------- comparing


def compare(evaluation: Evaluation, baselines: list[Evaluation]) -> Comparison:
    """Deltas and Δ% of `evaluation` against the baselines; every task needs a baseline that has it."""
    deltas, percent = {}, {}
    for task, metrics in evaluation.tasks.items():
        refs = [b.tasks[task] for b in baselines if task in b.tasks]
        if not refs:
            raise ConfigError(f"no baseline predicts task {task!r}; baselines: {[b.model for b in baselines]}")
        names = [m for m in metrics if m not in COUNTS]
        reference = {m: float(np.mean([r[m] for r in refs])) for m in names}
        deltas[task] = {m: metrics[m] - reference[m] for m in names}
        percent[task] = float(np.mean([relative_gain(m, metrics[m], reference[m]) for m in names]))
    return Comparison([b.model for b in baselines], deltas, 100 * float(np.mean(list(percent.values()))),
                      {t: 100 * p for t, p in percent.items()})


def relative_gain(metric: str, value: float, baseline: float) -> float:
    """(value - baseline) / baseline, negated for a metric where lower is better."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return sign * (value - baseline) / baseline if baseline else 0.0


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
        lines.append(f"Δ% vs {', '.join(comparison.baselines)}: {comparison.delta_percent:+.2f}")
    return "\n".join(lines)


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
    report: dict[str, Any] = {**asdict(evaluation), "mean_score": evaluation.mean_score,
                              "baselines": [asdict(b) for b in baselines],
                              "comparison": asdict(comparison) if comparison else None}
    if by_modality:
        report["by_modality"] = {m: {**asdict(e), "mean_score": e.mean_score} for m, e in by_modality.items()}
    storage.write_text(storage.join(out, "evaluation.json"), json.dumps(report, indent=2))
    rows = [{"model": e.model, "task": task, **metrics} for e in (evaluation, *baselines)
            for task, metrics in e.tasks.items()]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(out, "evaluation.csv"), buffer.getvalue())
