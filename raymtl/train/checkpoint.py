"""Training checkpoints: a saved-model artifact plus everything needed to resume exactly.

A checkpoint folder is a complete `raymtl.load`-able model (see `raymtl.models.artifact`) with three
extra files: `metrics.json` (the metrics it was reported with, which rank it), `train_state.pt` (optimizer, LR schedule, position in the task schedule, EWMA losses
and every rank's CPU and CUDA RNG states, so a resumed run continues the identical sequence of
tasks) and `run.json` (`RunMeta`: what the run's schedule and model were built from), which the
driver reads to refuse an incompatible resume before Ray starts. `run.json` is written last and
lists every other file with its size: Ray Train uploads a URI run's checkpoint file by file into
its final folder, so a folder missing one of them is a checkpoint whose upload did not finish.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import posixpath
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from raymtl.config import Experiment, global_batch
from raymtl.data.task_info import TaskInfo
from raymtl.errors import DataError
from raymtl.models.artifact import META_FILE, WEIGHTS_FILE

T = TypeVar("T")
logger = logging.getLogger("raymtl")

TRAIN_STATE_FILE = "train_state.pt"
RUN_META_FILE = "run.json"
CHECKPOINT_METRICS_FILE = "metrics.json"


@dataclass
class Position:
    """Where training is: `step` steps of epoch `epoch`'s plan are done (global_step counts all).

    `worlds` is how the epoch's plan came to be (`plan.epoch_plan`): `[world, global batch, from_step]`
    for the world it started on and each resize since; `consumed` the rows each task read in the
    epoch (all ranks), `samples` the global samples of the run. `resizes`/`recoveries` count the
    run's changes of world size and restarts from a checkpoint (`events`: a row for each).
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    samples: int = 0
    worlds: list[list[int]] = field(default_factory=list)
    consumed: dict[str, int] = field(default_factory=dict)
    resizes: int = 0
    recoveries: int = 0
    events: list[dict] = field(default_factory=list)  # the metrics rows of the resizes and recoveries


@dataclass
class RunMeta:
    """What a checkpoint's run was: its model's identity and the inputs of its task schedule.

    `model` (task names, label maps, groups, architecture) must match to resume at all; `schedule`
    (world size, batches per task and rank, seed, sampler, each task's training rows, shuffle) says
    how a mid-epoch resume continues (`resume_position`).
    """

    model: dict[str, Any]
    schedule: dict[str, Any]
    files: dict[str, int] | None = None  # the checkpoint's other files and sizes (`save`; None: from before)

    @classmethod
    def of(cls, exp: Experiment, infos: dict[str, TaskInfo], batches: dict[str, int], world_size: int) -> RunMeta:
        spec = exp.model
        return cls(
            model={
                "tasks": sorted(infos),
                "labels": {name: [str(label) for label in info.labels] for name, info in sorted(infos.items())},
                "groups": {g: sorted(ts) for g, ts in sorted(exp.task_groups().items())},
                "views": [v.name for v in exp.data.views],
                "architecture": {
                    "image_backbone": spec.image_backbone,
                    "text_encoder": spec.text_encoder,
                    "text_config": spec.text_config,
                    "text_pooling": spec.text_pooling,
                    "hidden_dim": spec.hidden_dim,
                    "base": spec.base,
                },
            },
            schedule={
                "world_size": world_size,
                "batches": dict(sorted(batches.items())),
                "seed": exp.seed,
                "sampler": exp.training.sampler,
                "temperature": exp.training.temperature,
                "rows": {name: info.n_train for name, info in sorted(infos.items())},
                "shuffle": exp.data.shuffle,
                "batch_size": exp.training.batch_size,
                "global_batch": global_batch(exp.training, world_size),
            },
        )

    def model_change(self, other: RunMeta) -> str | None:
        """What of the model differs from `other`'s, in words; None when nothing does."""
        old, new = other.model, self.model
        if old["tasks"] != new["tasks"]:
            gone, added = sorted(set(old["tasks"]) - set(new["tasks"])), sorted(set(new["tasks"]) - set(old["tasks"]))
            return f"tasks changed (removed {gone}, added {added})"
        for task, labels in new["labels"].items():
            if labels != old["labels"][task]:
                return f"labels of task {task!r} changed ({old['labels'][task]} -> {labels})"
        for key in ("groups", "views", "architecture"):
            if old[key] != new[key]:
                return f"model {key} changed ({old[key]} -> {new[key]})"
        return None

    def save(self, folder: Path) -> None:
        """Write `run.json`, the checkpoint's last file: it lists the others (`missing_files`)."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != RUN_META_FILE}
        (folder / RUN_META_FILE).write_text(json.dumps(asdict(dataclasses.replace(self, files=files)), indent=1))

    @classmethod
    def from_json(cls, text: str) -> RunMeta:
        return cls(**json.loads(text))


def rng_state() -> dict:
    """This process's generators; of the GPUs, only its own device's (the current one).

    A rank sees every GPU of its node but advances only its device's generator, and a resumed rank
    may land on another GPU: the state goes with the rank, not with a device index.
    """
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        device, cuda = torch.cuda.current_device(), state["cuda"]
        if isinstance(cuda, list):  # an older checkpoint: every visible GPU's state, by index
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def save_train_state(
    folder: Path,
    *,
    position: Position,
    stage: int,
    optimizer: torch.optim.Optimizer,
    scaler: dict | None = None,
    lr_schedule_state: dict,
    ewma: dict[str, dict],
    affinity: dict | None,
    rng_states: list[dict],
    meta: RunMeta,
) -> None:
    torch.save(
        {
            "position": asdict(position),
            "stage": stage,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler,  # fp16's GradScaler (scale, growth tracker); None in other formats
            "lr_schedule": lr_schedule_state,
            "ewma": ewma,
            "affinity": affinity,
            "rng": rng_states,
        },
        Path(folder) / TRAIN_STATE_FILE,
    )
    meta.save(folder)


def report_checkpoint(
    run_dir: str, write: Callable[[Path], None], metrics: dict, retention: Any = None, background: bool = True
) -> None:
    """`write` a checkpoint folder and report it to Ray Train with `metrics`.

    In a local run folder the checkpoint is written in place, in a hidden staging folder renamed to
    its final name once complete, and reported with `NO_UPLOAD`: Ray Train registers it without
    copying it (a ResNet-50 with AdamW state is ~300 MB per epoch). Remote storage (URIs) gets a
    local temporary folder that Ray Train uploads in the background (`CheckpointUploadMode.ASYNC`,
    the folder deleted once uploaded) while training goes on; `background=False` waits for the
    upload (a checkpoint before a preemption must be stored before the node goes). The name follows Ray Train's own
    (`checkpoint_<date>_<time.microseconds>`), so the newest checkpoint sorts last either way.
    `retention` (`in_process.Retention`, for a run without a Train controller) prunes the folder after.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    from raymtl import storage

    def write_all(folder: Path) -> None:
        (folder / CHECKPOINT_METRICS_FILE).write_text(json.dumps(metrics))
        write(folder)  # run.json last (`RunMeta.save`), listing the rest

    if storage.is_uri(run_dir):
        tmp = Path(tempfile.mkdtemp(prefix="raymtl_checkpoint_"))
        try:
            write_all(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        mode = CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)
        return
    name = f"checkpoint_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
    final, staging = Path(run_dir) / name, Path(run_dir) / f".{name}"
    try:
        staging.mkdir(parents=True)
        write_all(staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)), checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
    if retention is not None:
        retention.prune(run_dir)


def load_train_state(folder: Path) -> dict:
    """The train state, with `meta` (None for a checkpoint written before run.json existed)."""
    state = torch.load(Path(folder) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    state["position"] = Position(**state["position"])
    meta = Path(folder) / RUN_META_FILE
    state["meta"] = RunMeta.from_json(meta.read_text()) if meta.exists() else None
    return state


def best_of(found: Sequence[tuple[T, dict]], metric: str, mode: str) -> T | None:
    """The item of `found` ((item, its reported metrics) pairs) best by `metric`, the first of equals (as
    Ray Train's `get_best_checkpoint`: the older, in its list as in a run folder's); never one whose score
    is NaN or missing, which Ray's would name: None when no item has a number for it."""
    scored = [(item, metrics[metric]) for item, metrics in found
              if isinstance(metrics.get(metric), (int, float)) and not math.isnan(metrics[metric])]
    if not scored:
        return None
    best, _ = (max if mode == "max" else min)(scored, key=lambda pair: pair[1])
    return best


def checkpoint_score(exp: Experiment, infos: dict[str, TaskInfo]) -> str | None:
    """The metric checkpoints are ranked by; None when it is a validation metric and no task has validation data."""
    metric = exp.training.checkpoint_metric
    return metric if any(i.n_val for i in infos.values()) or not metric.startswith("val/") else None


def missing_files(folder: str, meta: RunMeta) -> list[str]:
    """The files of checkpoint `folder` that its `run.json` (`meta`) lists and the folder lacks or
    holds at another size: an upload cut short. A checkpoint from before the list needs the files a
    resume reads."""
    import pyarrow.fs as pafs

    from raymtl import storage

    fs, path = storage.resolve(folder)
    sizes = {posixpath.relpath(e.path, path): e.size
             for e in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if e.type == pafs.FileType.File}
    wanted = meta.files if meta.files is not None else dict.fromkeys((WEIGHTS_FILE, META_FILE, TRAIN_STATE_FILE))
    return sorted(name for name, size in wanted.items()
                  if name not in sizes or size is not None and size != sizes[name])


def latest_run_meta(run_dir: str) -> tuple[str, RunMeta] | None:
    """(folder, meta) of the newest complete checkpoint in a run folder; None when there is none.

    Ray Train names checkpoint folders `checkpoint_<date>_<time.microseconds>`, so the newest sorts
    last. A folder without `run.json` or missing a file it lists (`missing_files`) is skipped, in one
    log line: its resume would fail the same way at every retry.
    """
    import pyarrow.fs as pafs

    from raymtl import storage

    fs, path = storage.resolve(run_dir)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_"))
    for name in reversed(names):
        meta = storage.join(run_dir, name, RUN_META_FILE)
        if not storage.exists(meta):
            continue
        folder, found = storage.join(run_dir, name), RunMeta.from_json(storage.read_text(meta))
        missing = missing_files(folder, found)
        if not missing:
            return folder, found
        logger.warning("[raymtl] skipping the incomplete checkpoint %s (its upload did not finish: %s missing "
                       "or short)", folder, ", ".join(missing))
    return None


def newest_checkpoint(run_dir: str) -> str | None:
    """The folder of the run's newest checkpoint (`latest_run_meta`); None when there is none."""
    found = latest_run_meta(run_dir)
    return found[0] if found else None


def resume_position(saved: RunMeta | None, now: RunMeta, position: Position, rank: int = 0) -> Position:
    """Where a resumed run continues: the checkpoint's position, on the plan of its epoch.

    Another world size or global batch continues mid-epoch exactly: the checkpoint's epoch plan is
    re-cut for the new world from its step on (a `worlds` entry, see `plan.epoch_plan`), so every
    row of the epoch is still read once. A changed order (seed, sampler, temperature, shuffle) has no
    equivalent mid-epoch: the epoch restarts at its first step, with the checkpoint's weights and
    optimizer state (one warning line). A task whose training rows changed in number is a `DataError`
    mid-epoch: the plan's row indices no longer name the rows the epoch read (a new epoch plans on the
    new rows). A checkpoint from before a field was recorded is not checked on it.
    """
    if saved is None or position.step == 0:
        return dataclasses.replace(position, worlds=[])  # a new epoch: planned for the world it runs on
    world, size = now.schedule["world_size"], now.schedule["global_batch"]
    old = saved.schedule
    rows = {task: (n, now.schedule["rows"][task]) for task, n in old.get("rows", {}).items()
            if n != now.schedule["rows"][task]}
    if rows:
        changes = ", ".join(f"task {task!r} {n} -> {m}" for task, (n, m) in sorted(rows.items()))
        raise DataError(
            f"cannot resume epoch {position.epoch + 1} at step {position.step}: the training rows changed "
            f"({changes}), so the rest of the epoch would read some rows twice and skip others; restore the "
            "data the checkpoint was trained on, or train under a new name"
        )
    worlds = position.worlds or [[old["world_size"], old.get("global_batch", old["batch_size"] * old["world_size"]), 0]]
    changed = [k for k in ("seed", "sampler", "temperature", "shuffle") if k in old and old[k] != now.schedule[k]]
    if changed:
        if rank == 0:
            logger.warning(
                "[raymtl] resuming with a changed task order (%s): epoch %d restarts from its first step "
                "(%d of its steps were taken before the checkpoint)",
                ", ".join(f"{k} {old[k]} -> {now.schedule[k]}" for k in changed),
                position.epoch + 1, position.step,
            )
        return dataclasses.replace(position, step=0, worlds=[], consumed={})
    if worlds[-1][:2] != [world, size]:
        worlds = [*worlds, [world, size, position.step]]
    return dataclasses.replace(position, worlds=worlds)
