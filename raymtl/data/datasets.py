"""One streaming Ray Dataset per task and split: read -> select columns -> `Preprocessor`."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pandas as pd
import ray
import ray.data

from raymtl.config import Experiment
from raymtl.data.tables import TaskInfo, source_paths
from raymtl.data.transforms import Preprocessor

SPLITS = ("train", "val")
# Rows per map_batches call: ~32 MiB of output keeps blocks well under Ray Data's 128 MiB
# target and memory flat on a laptop; clamped so tiny rows still amortise per-call overhead.
_TARGET_BATCH_BYTES = 32 << 20
_MIN_BATCH, _MAX_BATCH = 8, 1024
_CACHE_SHARE = 0.25  # data.cache "auto": cache when the decoded inputs fit in this share of the object store


def dataset_key(task: str, split: str) -> str:
    """Key of one task split in `build_datasets`' result (and in Ray Train's dataset dict)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    return f"{task}.{split}"  # no "/": Ray Data names log files after datasets


def read_source(source: Any, columns: list[str] | None = None) -> ray.data.Dataset:
    """A parquet/CSV file, directory, glob or URI, or a pandas DataFrame, as a Ray Dataset.

    `columns` is selected first thing (Ray pushes it into the parquet read; a DataFrame is
    sliced before `from_pandas`) so unused columns never enter the object store.
    """
    if isinstance(source, pd.DataFrame):
        frame = source[columns] if columns else source
        # One DataFrame is one block, decoded by one task: cut it so the decode pool has work.
        blocks = max(1, min(4 * _decode_tasks(), len(frame) // _MIN_BATCH))
        bounds = [len(frame) * i // blocks for i in range(blocks + 1)]
        return ray.data.from_pandas([frame.iloc[a:b] for a, b in zip(bounds, bounds[1:])])
    fs, paths = source_paths(source)
    is_csv = any(".csv" in PurePosixPath(p).suffixes for p in paths)
    ds = (ray.data.read_csv if is_csv else ray.data.read_parquet)(paths, filesystem=fs)
    return ds.select_columns(columns) if columns else ds


def build_datasets(
    exp: Experiment, infos: dict[str, TaskInfo], splits: tuple[str, ...] = SPLITS, cache: bool = False
) -> dict[str, ray.data.Dataset]:
    """`{dataset_key(task, split): Dataset}` of model inputs, lazily streamed; "val" only where set.

    Bad images fail the job unless `data.skip_bad_images`, which drops and counts them. With
    `cache` the inputs are decoded now, once, and kept in the object store (see `should_cache`).
    """
    on_bad = "skip" if exp.data.skip_bad_images else "raise"
    datasets = {}
    for task in exp.tasks:
        prep = Preprocessor(task, infos[task.name], exp.data, on_bad=on_bad)
        for split in splits:
            source = task.train if split == "train" else task.validation
            if source is None:
                continue
            ds = read_source(source, prep.input_columns).map_batches(
                prep,
                batch_format="pandas",
                batch_size=_batch_size(prep),
                compute=ray.data.TaskPoolStrategy(size=_decode_tasks()),
                num_cpus=1,
                udf_modifying_row_count=on_bad == "skip",
            )
            datasets[dataset_key(task.name, split)] = ds.materialize() if cache else ds
    return datasets


def decoded_nbytes(exp: Experiment, infos: dict[str, TaskInfo]) -> int:
    """Estimated size of every task's decoded model inputs (train + validation)."""
    return sum(
        (infos[t.name].n_train + infos[t.name].n_val) * Preprocessor(t, infos[t.name], exp.data).row_nbytes
        for t in exp.tasks
    )


def should_cache(exp: Experiment, nbytes: int) -> bool:
    """Whether to decode once and keep the inputs for every epoch (`data.cache`), given their size.

    Preprocessing is deterministic, so each epoch would decode the very same inputs again, and
    every task's stream costs seconds to start, per epoch. "auto" keeps them when they take at
    most a quarter of the cluster's object store; larger data streams. `nbytes`: `decoded_nbytes`.
    """
    if exp.data.cache != "auto":
        return exp.data.cache == "always"
    return nbytes <= _CACHE_SHARE * ray.cluster_resources().get("object_store_memory", 0)


def _batch_size(prep: Preprocessor) -> int:
    return max(_MIN_BATCH, min(_MAX_BATCH, _TARGET_BATCH_BYTES // prep.row_nbytes))


def _decode_tasks() -> int:
    """Concurrent decode tasks per dataset: half the cluster's CPUs.

    The training workers hold the other half, and several task datasets stream at once; on a
    4-CPU laptop cluster that is 2, on a 64-CPU GPU node 32.
    """
    return max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
