"""Task inputs for the workers: raw task tables in the object store, decoded by Ray Data per plan.

The cost of a run must not grow with the number of tasks faster than its work does, so nothing
here is per task: the driver reads every task's raw columns (ids, labels, image paths, text) once
and puts each split's table in the object store; a worker turns its plan (`raymtl.data.plan`) for
an epoch into ONE Ray Data stream whose blocks are decoded batches tagged with their step, whatever
the number of tasks. With `data.cache`, every task's inputs are decoded once, in one Ray Data
execution, and every worker gathers its batches from them without any stream at all.

Decoded batches travel as one uniform `payload` column (the `Preprocessor` output pickled), so
blocks of tasks with different inputs and label shapes share a schema and never mix rows.

A run trained in the driver's own process (`training.in_process`) without a Ray cluster holds the
same tables in the process instead of object refs (`TaskInputs.in_process`): a cache small enough
is decoded right here, so such a run never starts Ray (`needs_ray`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.data

from raymtl.config import ConfigError, Experiment
from raymtl.data.plan import Step
from raymtl.data.source_blocks import SourceBlocks
from raymtl.data.tables import file_format, is_small, read_table, source_paths
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import Preprocessor

SPLITS = ("train", "val")
# Decoded rows per cached chunk: ~32 MiB keeps blocks well under Ray Data's 128 MiB target.
_TARGET_CHUNK_BYTES = 32 << 20
_MIN_CHUNK, _MAX_CHUNK = 8, 4096
_CACHE_SHARE = 0.25  # data.cache "auto": cache when the decoded inputs fit in this share of the object store
_CACHE_BLOCK_ROWS = 4096  # rows decoded per Ray task when caching
_DEFAULT_STORE_SHARE = 0.3  # Ray's default object store: 30 % of the machine's memory
_STREAM_STEPS_PER_BLOCK = 4  # batches decoded per Ray task when streaming
_STREAM_PREFETCH_BLOCKS = 2  # blocks decoded ahead of the loop, per rank: bounds its memory


def dataset_key(task: str, split: str) -> str:
    """Key of one task split in `TaskInputs.sources` (a split name has no ".")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    return f"{task}.{split}"


def read_source(source: Any, columns: list[str] | None = None) -> ray.data.Dataset:
    """A parquet/CSV file, directory, glob or URI, or a pandas DataFrame, as a Ray Dataset.

    Each file is read in the format its own name says, as `inspect_tasks` checks it. `columns` is selected first thing (Ray pushes it into the parquet read; a DataFrame is
    sliced before `from_pandas`) so unused columns never enter the object store.
    """
    if isinstance(source, pd.DataFrame):
        frame = source[columns] if columns else source
        # One DataFrame is one block, read by one task: cut it so downstream work runs in parallel.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
        blocks = max(1, min(4 * cpus, len(frame) // _MIN_CHUNK))
        bounds = [len(frame) * i // blocks for i in range(blocks + 1)]
        return ray.data.from_pandas([frame.iloc[a:b] for a, b in zip(bounds, bounds[1:])])
    fs, paths = source_paths(source)
    readers = {"parquet": ray.data.read_parquet, "csv": ray.data.read_csv}
    by_format = {fmt: [p for p in paths if file_format(p) == fmt] for fmt in readers}
    parts = [readers[fmt](files, filesystem=fs) for fmt, files in by_format.items() if files]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.select_columns(columns) if columns else ds


@dataclass
class TaskInputs:
    """What a worker needs to read any batch of any task: picklable, holds object refs.

    `sources`: raw table (input columns only) of each task split, by `dataset_key`; a large split's
    blocks as the cluster read them (`SourceBlocks`).
    `cached`: with `data.cache`, the decoded inputs: Arrow tables of (key, start, payload) chunks.
    Both hold object refs, or the tables themselves where no Ray cluster runs (`in_process`).
    """

    preprocessors: dict[str, Preprocessor]
    sources: dict[str, ray.ObjectRef | pa.Table]
    rows: dict[str, int]
    skip_bad_images: bool
    cached: list[ray.ObjectRef | pa.Table] | None = None

    def in_process(self) -> TaskInputs:
        """These inputs with every table copied into this process's memory: they outlive the Ray
        cluster (a table `ray.get` returns is a view of the object store's shared memory)."""
        return dataclasses.replace(
            self,
            sources={key: ref.owned(_owned) if isinstance(ref, SourceBlocks) else _owned(ref)
                     for key, ref in self.sources.items()},
            cached=[_owned(ref) for ref in self.cached] if self.cached is not None else None,
        )


def _put(table: pa.Table) -> ray.ObjectRef | pa.Table:
    """`table` in the object store when a Ray cluster runs here, else the table itself."""
    return ray.put(table) if ray.is_initialized() else table


def _table(ref: ray.ObjectRef | pa.Table) -> pa.Table:
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _owned(ref: ray.ObjectRef | pa.Table) -> pa.Table:
    """The table, copied into this process's memory (an Arrow IPC round trip)."""
    table = _table(ref)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def build_inputs(exp: Experiment, infos: dict[str, TaskInfo], *, cache: bool = False) -> TaskInputs:
    """Read every task split's raw columns into the object store (and decode them once if `cache`).

    Runs on the driver before training: reads are concurrent, and their row counts are checked
    against `infos` (a source that changed since it was inspected would shift every shard).
    """
    on_bad = "mark" if exp.data.skip_bad_images else "raise"
    preps = {t.name: Preprocessor(t, infos[t.name], exp.data, on_bad=on_bad) for t in exp.tasks}
    wanted = {
        dataset_key(t.name, split): (t.name, source)
        for t in exp.tasks
        for split, source in (("train", t.train), ("val", t.validation))
        if source is not None
    }

    def read(item: tuple[str, tuple[str, Any]]) -> tuple[str, pa.Table | SourceBlocks]:
        key, (task, source) = item
        columns = preps[task].input_columns
        if ray.is_initialized() and not is_small(source):
            table = SourceBlocks.read(read_source(source, columns))  # by the cluster, never in this process
        else:  # read by inspection already (`tables.read_parts` keeps small files): not opened again
            table = pa.Table.from_pandas(read_table(source, columns), preserve_index=False)
        expected = infos[task].n_train if key.endswith(".train") else infos[task].n_val
        if table.num_rows != expected:
            raise ConfigError(f"task {task!r}: {key.rsplit('.', 1)[1]} source has {table.num_rows} rows now, "
                              f"{expected} when it was checked; did it change?")
        return key, table

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="raymtl-read") as pool:
        tables = dict(pool.map(read, wanted.items()))
    inputs = TaskInputs(
        preprocessors=preps,
        sources={key: table if isinstance(table, SourceBlocks) else _put(table) for key, table in tables.items()},
        rows={key: table.num_rows for key, table in tables.items()},
        skip_bad_images=exp.data.skip_bad_images,
    )
    if cache:
        chunks = [
            (key, start, min(start + _chunk_rows(preps[task_of(key)]), n))
            for key, n in inputs.rows.items()
            for start in range(0, n, _chunk_rows(preps[task_of(key)]))
        ]
        items = [{"key": key, "seq": start, "rows": np.arange(start, stop)} for key, start, stop in chunks]
        total = sum(inputs.rows.values())
        if total <= _CACHE_BLOCK_ROWS or not ray.is_initialized():
            # One decode task's worth (or no cluster): decoded right here, the same `_decode`, without
            # starting Ray Data's executor, its actors and a worker process (seconds and ~0.3 GB on a small box).
            columns = {name: [item[name] for item in items] for name in ("key", "seq", "rows")}
            decoded = _decode(columns, inputs.sources, preps)
            payload = pa.array(list(decoded["payload"]), pa.binary())
            inputs.cached = [_put(pa.table({**decoded, "payload": payload}))]
        else:
            # ~_CACHE_BLOCK_ROWS rows per decode task: as many parallel tasks as the data fills.
            per_block = max(1, _CACHE_BLOCK_ROWS * len(items) // max(1, total))
            inputs.cached = _decoded(inputs, items, steps_per_block=per_block).materialize().to_arrow_refs()
    return inputs


def task_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def decoded_nbytes(exp: Experiment, infos: dict[str, TaskInfo]) -> int:
    """Estimated size of every task's decoded model inputs (train + validation)."""
    return sum(
        (infos[t.name].n_train + infos[t.name].n_val) * Preprocessor(t, infos[t.name], exp.data).row_nbytes
        for t in exp.tasks
    )


def should_cache(exp: Experiment, nbytes: int) -> bool:
    """Whether to decode once and keep the inputs for every epoch (`data.cache`), given their size.

    Preprocessing is deterministic, so each epoch would decode the very same inputs again. "auto"
    keeps them when they take at most a quarter of the cluster's object store (without a cluster:
    of the store Ray would make here); larger data streams. `nbytes`: `decoded_nbytes`.
    """
    if exp.data.cache != "auto":
        return exp.data.cache == "always"
    if ray.is_initialized():
        store = ray.cluster_resources().get("object_store_memory", 0)
    else:
        store = _DEFAULT_STORE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return nbytes <= _CACHE_SHARE * store


def needs_ray(cache: bool, rows: int) -> bool:
    """Whether a run in this process needs a Ray cluster for its data: to stream it (no cache), or to
    decode a cache of more than one decode task's rows in parallel (then fetched, see `in_process`)."""
    return not cache or rows > _CACHE_BLOCK_ROWS


def _chunk_rows(prep: Preprocessor) -> int:
    return max(_MIN_CHUNK, min(_MAX_CHUNK, _TARGET_CHUNK_BYTES // prep.row_nbytes))


# ---------------------------------------------------------------- decoding (Ray Data tasks)


def _data_context() -> ray.data.DataContext:
    """This process's Ray Data context: no per-operator progress bars (they drown the epoch table),
    and a decode task's own exception raised as is (a bad image's error names the file; wrapped in
    Ray Data's UserCodeException, its message would not survive the trip to the driver)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True
    return ctx


def _decoded(inputs: TaskInputs, items: list[dict], steps_per_block: int) -> ray.data.Dataset:
    """A Dataset of `{key, seq, payload}` rows: each item's rows of its task split, decoded and pickled."""
    _data_context()
    blocks = max(1, -(-len(items) // steps_per_block))
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _decode,
        fn_kwargs={"sources": inputs.sources, "preprocessors": inputs.preprocessors},
        batch_size=None,
        batch_format="numpy",
    )


def _decode(batch: dict[str, Sequence], sources: dict, preprocessors: dict[str, Preprocessor]) -> dict:
    """`batch`'s items (key, seq, rows columns: a Ray Data numpy batch, or lists) decoded and pickled."""
    payloads = []
    for key, rows in zip(batch["key"], batch["rows"]):
        frame = _source(sources[key]).take(pa.array(np.asarray(rows, np.int64))).to_pandas()
        payloads.append(pickle.dumps(preprocessors[task_of(key)](frame), protocol=pickle.HIGHEST_PROTOCOL))
    return {"key": batch["key"], "seq": batch["seq"], "payload": np.array(payloads, dtype=object)}


def _source(ref: ray.ObjectRef | pa.Table | SourceBlocks) -> pa.Table | SourceBlocks:
    return ref if isinstance(ref, (pa.Table, SourceBlocks)) else _fetched(ref)


@functools.lru_cache(maxsize=256)
def _fetched(ref: ray.ObjectRef) -> pa.Table:
    """A raw task table, fetched once per decode process (zero-copy from the object store)."""
    return ray.get(ref)


# ---------------------------------------------------------------- reading (in the workers)


def stream(inputs: TaskInputs, split: str, steps: list[Step]) -> Iterator[dict[str, np.ndarray]]:
    """The decoded batch of every step, in order: one Ray Data stream for all tasks of the plan."""
    if not steps:
        return
    _data_context().execution_options.preserve_order = True  # the plan's order is the data order
    items = [{"key": dataset_key(s.task, split), "seq": i, "rows": s.rows} for i, s in enumerate(steps)]
    ds = _decoded(inputs, items, _STREAM_STEPS_PER_BLOCK)
    expected = 0
    for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=_STREAM_PREFETCH_BLOCKS):
        for seq, payload in zip(block["seq"], block["payload"]):
            if seq != expected:
                raise RuntimeError(f"decoded step {seq} arrived where step {expected} was due")
            expected += 1
            yield pickle.loads(payload)


class DecodedCache:
    """Every task split's decoded inputs in this process, gathered into batches by row index."""

    def __init__(self, refs: list[ray.ObjectRef | pa.Table]) -> None:
        chunks: dict[str, list[tuple[int, dict]]] = {}
        for ref in refs:  # one block at a time: the raw bytes of all of them never coexist
            table = _table(ref)
            for key, start, payload in zip(*(table.column(c).to_pylist() for c in ("key", "seq", "payload"))):
                chunks.setdefault(key, []).append((start, pickle.loads(payload)))
        self.chunks = {key: sorted(parts, key=lambda p: p[0]) for key, parts in chunks.items()}
        self.starts = {key: np.array([s for s, _ in parts]) for key, parts in self.chunks.items()}

    def gather(self, key: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The decoded rows `rows` of one task split, in that order (fresh, writable arrays)."""
        parts = self.chunks[key]
        which = np.searchsorted(self.starts[key], rows, side="right") - 1
        if len(parts) == 1:
            return {name: col[rows] for name, col in parts[0][1].items()}
        first = parts[which[0]][1]
        out = {name: np.empty((len(rows), *col.shape[1:]), col.dtype) for name, col in first.items()}
        for c in np.unique(which):
            mask = which == c
            start, cols = parts[c]
            for name, col in cols.items():
                out[name][mask] = col[rows[mask] - start]
        return out
