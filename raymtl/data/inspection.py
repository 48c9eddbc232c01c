"""Task inspection: every task's tables checked against its config and described, before Ray starts.

`inspect_tasks` reads a small table once, with every column the run needs (kept for the pre-flight
and the task inputs), and streams only the label column of a large one, so it stays cheap on big
tables while still failing fast, with the task, file, column or label named, on data faults that
would otherwise surface minutes later inside a Ray worker.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from raymtl.config import ConfigError, DataSpec, Experiment, TaskSpec
from raymtl.data.tables import check_source, is_small, label_batches, label_names, read_parts
from raymtl.data.task_info import TaskInfo


def inspect_tasks(exp: Experiment) -> dict[str, TaskInfo]:
    """Check every task's data against the config and describe it (run before Ray starts)."""
    return {t.name: _inspect_task(t, exp.data) for t in exp.tasks}


def _inspect_task(task: TaskSpec, data: DataSpec) -> TaskInfo:
    if task.text_column is not None and not data.tokenizer:
        raise ConfigError(
            f"task {task.name!r}: text_column {task.text_column!r} is set but data.tokenizer is not; "
            "set data.tokenizer to a local Hugging Face tokenizer directory"
        )
    train = _split_labels(task, "train", task.train, data)
    val = _split_labels(task, "validation", task.validation, data) if task.validation is not None else _Split()
    test = _split_labels(task, "test", task.test, data) if task.test is not None else _Split()
    labels = _label_names(task, train, val, test)
    _check_count(task, labels)
    return TaskInfo(
        name=task.name,
        kind=task.kind,
        labels=labels,
        n_train=train.rows,
        n_val=val.rows,
        has_image=task.image_column is not None or any(v.column for v in data.views),
        has_text=task.text_column is not None,
        weight=task.weight,
        threshold=task.threshold,
        n_test=test.rows,
    )


@dataclass
class _Split:
    """Row count and label names (str) per file of one task split."""

    rows: int = 0
    labels_by_file: dict[str, set[str]] = field(default_factory=dict)

    def labels(self) -> set[str]:
        return set().union(*self.labels_by_file.values())


def _required_columns(task: TaskSpec, data: DataSpec) -> dict[str, str]:
    """Column -> config field naming it, for every column the pipeline will read."""
    required = {
        task.label_column: "label_column",
        task.image_column: "image_column",
        task.text_column: "text_column",
        task.id_column: "id_column",
    }
    required.update({v.column: f"data.views[{i}].column" for i, v in enumerate(data.views) if v.column})
    return {column: role for column, role in required.items() if column is not None}


def _split_labels(task: TaskSpec, split: str, source: Any, data: DataSpec) -> _Split:
    """Rows and label names per file. A small source is read here, once with every column the run
    reads (kept for the pre-flight and the task inputs, `tables.read_parts`); a large one has its
    label column streamed, one record batch at a time, so the driver never holds its rows."""
    where = f"task {task.name!r} ({split})"
    required = _required_columns(task, data)
    try:
        if is_small(source):
            parts = read_parts(source, [task.label_column], required)
            result = _Split(
                rows=sum(len(df) for _, df in parts),
                labels_by_file={name: _cell_labels(df[task.label_column], task, name) for name, df in parts},
            )
        else:
            check_source(source, required)
            result = _Split()
            for name, first, values in label_batches(source, task.label_column):
                found = _cell_labels(values, task, name, first)
                result.labels_by_file[name] = result.labels_by_file.get(name, set()) | found
                result.rows += len(values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if result.rows == 0:
        raise ConfigError(f"{where}: {_describe(source)} has no rows")
    return result


def _describe(source: Any) -> str:
    return "the DataFrame" if isinstance(source, pd.DataFrame) else repr(os.fspath(source))


def _cell_labels(values: pd.Series, task: TaskSpec, where: str, first_row: int = 0) -> set[str]:
    """Label names in the label column of one file (`where`; `values` from its row `first_row` on),
    after checking each cell's shape; named as the preprocessor names them (`tables.label_names`)."""
    column = task.label_column
    is_list = values.map(lambda cell: isinstance(cell, (list, tuple, np.ndarray))).to_numpy(dtype=bool)
    if task.kind == "multilabel":
        if not is_list.all():
            row = int(np.flatnonzero(~is_list)[0])
            raise ConfigError(
                f"multilabel label_column {column!r} needs a list of labels in every row "
                f"(a parquet list column or a DataFrame of lists; CSV cannot hold lists); "
                f"row {first_row + row} of {where} holds {values.iloc[row]!r} ({type(values.iloc[row]).__name__})"
            )
        return set(label_names(values, multilabel=True)[1])
    if is_list.any():
        row = int(np.flatnonzero(is_list)[0])
        raise ConfigError(
            f"label_column {column!r} holds a list in row {first_row + row} of {where} ({list(values.iloc[row])!r}) "
            "but the task is multiclass; set `kind: multilabel` for several labels per item"
        )
    missing = np.flatnonzero(values.isna().to_numpy())
    if len(missing):
        raise ConfigError(
            f"label_column {column!r} is empty in {len(missing)} row(s) of {where} (first: row {first_row + missing[0]})"
            + " (in a CSV, a cell reading NA, null, N/A, NaN or #N/A is empty too)"
        )
    return set(label_names(values, multilabel=False)[1])


def _label_names(task: TaskSpec, train: _Split, val: _Split, test: _Split) -> list[str]:
    """The task's label map (index = class id), after checking every label can be encoded.

    With an explicit `labels` list that list is the map, so it alone bounds the labels (a listed
    class may lack train rows). Otherwise the map is the train labels, so validation and test may
    not bring new ones.
    """
    if task.labels is not None:
        names = [str(label) for label in task.labels]
        for split, part in (("train", train), ("validation", val), ("test", test)):
            _check_known(task, split, part, set(names), f"is not in the task's `labels` {names}")
        return names
    names = sorted(train.labels(), key=_label_order)
    why = "does not occur in the train data (add it there or list the task's `labels`)"
    for split, part in (("validation", val), ("test", test)):
        _check_known(task, split, part, set(names), why)
    return names


def _check_count(task: TaskSpec, names: list[str]) -> None:
    """A head needs a label to predict (no label: no outputs, and a NaN loss), and a classifier over one
    class learns nothing."""
    if len(names) >= (2 if task.kind == "multiclass" else 1):
        return
    where, source = ((f"task {task.name!r}", f"`labels` {names}") if task.labels is not None
                     else (f"task {task.name!r} (train)", _describe(task.train)))
    if not names:
        raise ConfigError(f"{where}: {source} has no label (every row's label list is empty); a task needs one")
    raise ConfigError(f"{where}: {source} has one label, {names[0]!r}; a multiclass task needs at least two "
                      "(add rows of the others, or list them in `labels`)")


def _check_known(task: TaskSpec, split: str, part: _Split, known: set[str], why: str) -> None:
    for name, labels in part.labels_by_file.items():
        unknown = sorted(labels - known, key=_label_order)
        if unknown:
            raise ConfigError(f"task {task.name!r} ({split}): label {unknown[0]!r} in {name} {why}")


def _label_order(name: str) -> tuple[int, float, str]:
    """Sort numeric labels numerically ('2' before '10'), then the rest alphabetically."""
    try:
        number = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (1, 0.0, name) if math.isnan(number) else (0, number, name)
