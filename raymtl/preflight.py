"""Checks run before Ray starts, cheap enough for the command line's first two seconds.

`check` covers what a config can get wrong beyond its own fields: every task's tables, columns
and labels (`inspect_tasks`), that `training.checkpoint_metric` is measured, that `storage_path`
takes a file, and that a few of each task's images decode. It imports no torch, Ray or transformers, so `raymtl train` reports a bad input
in about a second instead of after Ray and a worker have started.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa

from raymtl import storage
from raymtl.console import BAD_IMAGE_HINT
from raymtl.config import ConfigError, Experiment, TaskSpec, metric_task
from raymtl.data.inspection import inspect_tasks
from raymtl.data.tables import head_rows, is_small, read_table
from raymtl.data.task_info import TaskInfo

IMAGE_SAMPLE = 8  # images decoded per task and image column


def check(exp: Experiment) -> dict[str, TaskInfo]:
    """Everything checkable without Ray; returns the tasks' infos. Raises ConfigError naming the fault."""
    infos = inspect_tasks(exp)
    check_measured(exp.training.checkpoint_metric, infos, "training.checkpoint_metric")
    check_storage(exp.storage_path)
    for task in exp.tasks:
        if infos[task.name].has_image:
            check_images(task, exp)
    return infos


def check_measured(metric: str, infos: dict[str, TaskInfo], path: str) -> None:
    """A task's validation metric needs its validation data (with none at all, checkpoints are kept
    by recency: `checkpoint_score`)."""
    task = metric_task(metric)
    if task and metric.startswith("val/") and not infos[task].n_val and any(i.n_val for i in infos.values()):
        raise ConfigError(f"{path}: {metric!r} is never measured: task {task!r} has no validation data")


def check_storage(path: str) -> None:
    """`path` (a folder or URI) exists or can be created, and takes a file: create and remove a probe."""
    where = f"storage_path {path!r}"
    try:
        fs, root = storage.resolve(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot open its filesystem: {e}") from None
    probe = f"{root.rstrip('/')}/.raymtl-probe-{uuid.uuid4().hex}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{where} is not writable: {e}") from None


def check_images(task: TaskSpec, exp: Experiment) -> None:
    """A few images spread over the task's train rows decode, in every image column it reads.

    With `data.skip_bad_images` a bad image is allowed, but not a sample where none decodes
    (a wrong column or a moved image folder).
    """
    from raymtl.data.image_io import read_all  # PIL: only when a task has images
    from raymtl.data.transforms import decode_image

    columns = list(dict.fromkeys(v.column or task.image_column for v in exp.data.views))
    if is_small(task.train):  # kept by `inspect_tasks`: not read again
        frame = read_table(task.train, columns=columns)
        rows = np.unique(np.linspace(0, len(frame) - 1, num=min(IMAGE_SAMPLE, len(frame))).astype(int))
    else:  # the first rows of its first files, not the table
        frame = head_rows(task.train, columns, IMAGE_SAMPLE)
        rows = np.arange(min(IMAGE_SAMPLE, len(frame)))
    for column in columns:
        errors = []
        uris = frame[column].to_numpy()[rows]
        for uri, data in zip(uris, read_all(uris, exp.data.read_concurrency)):
            try:
                if isinstance(data, Exception):
                    raise data
                decode_image(data)
            except storage.TransientReadError:  # the store's fault, not the image's: fail, do not judge the sample
                raise
            except Exception as e:  # noqa: BLE001 -- whatever PIL or the filesystem raise, name the file
                errors.append(f"task {task.name!r}: cannot read image {uri!r} in column {column!r}: "
                              f"{type(e).__name__}: {e}")
        if errors and (not exp.data.skip_bad_images or len(errors) == len(rows)):
            hint = BAD_IMAGE_HINT if not exp.data.skip_bad_images else "no sampled image decodes"
            raise ConfigError(f"{errors[0]} ({hint})")
