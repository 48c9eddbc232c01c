"""What a run shows and keeps per epoch: the metrics row, metrics.jsonl, TensorBoard, the table."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Collection
from typing import Any

from raymtl import storage
from raymtl.console import ProgressSender
from raymtl.train.metrics import Ewma, summary_table
from raymtl.train.affinity import AffinityTracker, plot_heatmap

# Workers log rather than print: Ray Train tees a worker's print to stdout and its log, twice.
logger = logging.getLogger("raymtl")
METRICS_FILE = "metrics.jsonl"
AFFINITY_FILE = "affinity.json"
TENSORBOARD_DIR = "tensorboard"
SHORT_NAMES = {"accuracy": "acc", "micro_f1": "f1"}  # the primary metrics' column names in tables


def epoch_row(epoch: int, global_step: int, val: dict[str, dict], ewma: dict[str, Ewma], lr: float) -> dict:
    """One flat metrics row: `val/<task>/<metric>`, `train/<task>/loss_ewma` and the task means.

    `val/mean_score` averages each task's primary metric (accuracy, or micro-F1 for multilabel).
    """
    row: dict = {"epoch": epoch + 1, "global_step": global_step, "lr": lr}
    for task, metrics in val.items():
        for name, value in metrics.items():
            row[f"val/{task}/{name}"] = value
    for task, e in ewma.items():
        if e.value is not None:
            row[f"train/{task}/loss_ewma"] = e.value
    if val:
        row["val/mean_loss"] = sum(m["loss"] for m in val.values()) / len(val)
        row["val/mean_score"] = sum(m[primary_metric(m)] for m in val.values()) / len(val)
    train = [e.value for e in ewma.values() if e.value is not None]
    if train:
        row["train/mean_loss_ewma"] = sum(train) / len(train)
    return row


def primary_metric(metrics: Collection[str]) -> str:
    """A task's headline metric, from its metric names: accuracy (multiclass) or micro-F1 (multilabel)."""
    return "accuracy" if "accuracy" in metrics else "micro_f1"


def primary_key(row: dict, task: str) -> str:
    """The key of `task`'s primary metric in a metrics row: `val/<task>/accuracy` or `val/<task>/micro_f1`."""
    prefix = f"val/{task}/"
    return prefix + primary_metric({key[len(prefix):] for key in row if key.startswith(prefix)})


def format_history(history: list[dict]) -> str:
    """The per-epoch table: per task its validation loss and primary metric, then the means."""
    return summary_table([_compact(row) for row in history]) if history else "(no finished epoch)"


def _compact(row: dict) -> dict:
    out = {"epoch": row["epoch"]}
    tasks = dict.fromkeys(k.split("/")[1] for k in row if k.startswith(("val/", "train/")) and k.count("/") == 2)
    for task in tasks:
        if f"val/{task}/loss" in row:
            key = primary_key(row, task)
            out[f"{task} loss"] = row[f"val/{task}/loss"]
            out[f"{task} {SHORT_NAMES[key.rsplit('/', 1)[1]]}"] = row[key]
        else:
            out[f"{task} train loss"] = row.get(f"train/{task}/loss_ewma")
    for key, name in (("val/mean_loss", "mean loss"), ("val/mean_score", "mean score")):
        if key in row:
            out[name] = row[key]
    if "perf/samples_per_s" in row:
        out["samples/s"] = f"{row['perf/samples_per_s']:.1f}"
        out["data wait"] = f"{100 * row['perf/data_wait_fraction']:.1f}%"
    if "perf/epoch_s" in row:
        out["epoch s"] = f"{row['perf/epoch_s']:.1f}"
    return out


def read_rows(run_dir: str) -> list[dict]:
    """Every row of the run's metrics.jsonl: epochs and events."""
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def read_history(run_dir: str) -> list[dict]:
    """One row per finished epoch (without the resize and recovery rows)."""
    return [row for row in read_rows(run_dir) if "event" not in row]


class RunFiles:
    """Rank 0's per-epoch outputs in the run folder: metrics.jsonl, TensorBoard events, the table.

    `retention` (`in_process.Retention`): which checkpoints to keep, for a run without a Train controller.
    """

    def __init__(self, run_dir: str, retention: Any = None):
        from tensorboardX import SummaryWriter

        self.run_dir, self.retention = run_dir, retention
        self.tb_dest = storage.join(run_dir, TENSORBOARD_DIR)
        # A URI run writes its events locally and uploads them each epoch; the temporary folder goes
        # with this object (or the worker process).
        self._tb_tmp = tempfile.TemporaryDirectory(prefix="raymtl_tb_") if storage.is_uri(run_dir) else None
        self.tb_local = self._tb_tmp.name if self._tb_tmp else storage.resolve(self.tb_dest)[1]
        self.writer = SummaryWriter(self.tb_local)
        self.progress = ProgressSender(run_dir)

    def log_step(self, epoch: int, step: int, steps: int, task: str, loss: Ewma) -> None:
        """The step to the driver's progress bar (throttled) and a log line about every tenth of an epoch:
        the only times the EWMA is read off the device."""
        self.progress.step(epoch, step, steps, task, loss)
        if step == steps or step % max(1, steps // 10) == 0:
            value = loss.value  # None: this rank has had no batch of the task yet (its shard ran short)
            logger.info("epoch %d step %d/%d  %s loss~%s", epoch + 1, step, steps, task,
                        "n/a (no batch yet)" if value is None else f"{value:.4f}")

    def log_affinity(self, tracker: AffinityTracker) -> None:
        """affinity.json (the running mean, TAG's Z; the skipped count) and affinity.png (its heatmap) in the
        run folder."""
        storage.write_text(storage.join(self.run_dir, AFFINITY_FILE), json.dumps(tracker.to_dict(), indent=2))
        if not tracker.count:
            return
        with tempfile.TemporaryDirectory() as tmp:
            plot_heatmap(tracker.mean(), tracker.tasks, f"{tmp}/affinity.png")
            storage.upload_dir(tmp, self.run_dir)

    def log_events(self, history: list[dict], events: list[dict]) -> None:
        """metrics.jsonl: the epochs' rows and the resize/recovery rows (`event`), by global step.

        Rewritten from the checkpointed history: a resumed run never duplicates a row."""
        rows = sorted([*history, *events], key=lambda r: r.get("global_step", 0))  # stable: an epoch before its resume
        storage.write_text(storage.join(self.run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows))

    def log_epoch(self, row: dict, history: list[dict], events: list[dict] = ()) -> None:
        self.log_events(history, list(events))
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=row["epoch"])
        self.writer.flush()
        storage.upload_dir(self.tb_local, self.tb_dest)
        logger.info("\n%s", format_history(history))
        self.progress.epoch(row)
