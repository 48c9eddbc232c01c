"""Task inputs for the workers: raw task tables in the object store, decoded per plan by Ray tasks.

The cost of a run must not grow with the number of tasks faster than its work does, so nothing
here is per task: every task's raw columns (ids, labels, image paths, text) are read once, a small
split's table by the driver (the one it inspected) and put in the object store, a large split's by
Ray Data on the cluster, kept there as its blocks (`SourceBlocks`); a worker turns its plan (`raymtl.data.plan`) for
an epoch into ONE stream of decode tasks, one per step, whatever the number of tasks, read back in
plan order through a bounded reorder buffer (`in_order`). With `data.cache`, every task's inputs are
decoded once, in parallel Ray tasks, and every worker gathers its batches from them, no stream at all.

Decoded rows travel as `Decoded`: native numpy arrays (uint8 pixels, integer token ids and labels,
see `raymtl.data.transforms`) that Ray stores as raw buffers, never pickled, and `ray.get` hands
back as zero-copy views of the node's shared object store. The cache is therefore held once per
node however many ranks read it, and a rank copies only the rows of its batch.

A run trained in the driver's own process (`training.in_process`) without a Ray cluster holds the
same tables in the process instead of object refs (`TaskInputs.in_process`): a cache small enough
is decoded right here, so such a run never starts Ray (`needs_ray`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.data

from raymtl.config import ConfigError, Experiment
from raymtl.data.plan import Step
from raymtl.data.source_blocks import SourceBlocks
from raymtl.data.tables import (
    PARQUET_SUFFIXES, arrow_table, csv_convert, file_format, is_small, read_table, source_paths, to_pandas,
)
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import Preprocessor

SPLITS = ("train", "val")
# Decoded rows per cached chunk (one decode task each): ~32 MiB of uint8 rows per object.
_TARGET_CHUNK_BYTES = 32 << 20
_MIN_CHUNK, _MAX_CHUNK = 8, 4096
_CACHE_SHARE = 0.25  # data.cache "auto": cache when the decoded inputs fit in this share of a node's object store
_CACHE_BLOCK_ROWS = 4096  # at most this many rows in all: a cache decoded in the driver, no Ray tasks
_DEFAULT_STORE_SHARE = 0.3  # Ray's default object store: 30 % of the machine's memory
_PREFETCH_STEPS = 2  # decoded steps waiting for the loop, per rank, beyond those being decoded
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"  # Ray Data's, read when a parquet read is planned
FILES_PER_FOOTER_ACTOR = 100
_FOOTER_ENV_LOCK = threading.Lock()
T = TypeVar("T")


def dataset_key(task: str, split: str) -> str:
    """Key of one task split in `TaskInputs.sources` (a split name has no ".")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    return f"{task}.{split}"


def read_source(source: Any, columns: list[str] | None = None) -> ray.data.Dataset:
    """A parquet/CSV file, directory, glob or URI, or a pandas DataFrame, as one Ray Dataset (rows in
    no particular order across files of different formats: `read_source_parts` keeps the order)."""
    parts = read_source_parts(source, columns)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def read_source_parts(source: Any, columns: list[str] | None = None) -> list[ray.data.Dataset]:
    """A source as Ray Datasets whose rows, one after the other, are the source's rows in the order
    the driver reads them: one per run of same-format files (a union would interleave their blocks).

    Each file is read in the format its own name says, as `inspect_tasks` checks it. `columns` is
    selected first thing (Ray pushes it into the parquet read; a DataFrame is sliced before
    `from_pandas`) so unused columns never enter the object store; a CSV reads only its `columns`, as
    the driver reads them, as text (`tables.csv_convert`), so an unused column is never typed.
    """
    if isinstance(source, pd.DataFrame):
        frame = source[columns] if columns else source
        # One DataFrame is one block, read by one task: cut it so downstream work runs in parallel.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
        blocks = max(1, min(4 * cpus, len(frame) // _MIN_CHUNK))
        bounds = [len(frame) * i // blocks for i in range(blocks + 1)]
        return [ray.data.from_pandas([frame.iloc[a:b] for a, b in zip(bounds, bounds[1:])])]
    fs, paths = source_paths(source)
    csv = csv_convert(columns or [], select=bool(columns))  # unread columns are never typed
    readers = {"parquet": _read_parquet, "csv": functools.partial(ray.data.read_csv, convert_options=csv)}
    parts = [readers[fmt](list(files), filesystem=fs) for fmt, files in itertools.groupby(paths, key=file_format)]
    return [ds.select_columns(columns) for ds in parts] if columns else parts


def _read_parquet(files: list[str], filesystem: Any) -> ray.data.Dataset:
    """`ray.data.read_parquet`, its footer readers sized to the files (`footer_actors`). One read
    plans at a time (`build_inputs` reads sources from a thread pool): the count is in the
    environment only while its read is planned (milliseconds: the footers are read when it runs).
    Ray's own filter by name would drop `.pq` files: it is given every suffix `tables.file_format`
    reads as parquet."""
    with _FOOTER_ENV_LOCK:
        previous = os.environ.get(FOOTER_ACTORS_ENV)
        if previous is None:  # one the user set is theirs
            os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(len(files)))
        try:
            return ray.data.read_parquet(files, filesystem=filesystem, file_extensions=list(PARQUET_SUFFIXES))
        finally:
            if previous is None:
                os.environ.pop(FOOTER_ACTORS_ENV, None)


def footer_actors(files: int) -> int:
    """Actors to read the footers of `files` parquet files: one per `FILES_PER_FOOTER_ACTOR`, at most Ray's 32.

    Ray Data lists a parquet read by starting a pool of footer-reading actors, 32 whatever the
    files (sized for thousands on object storage), and stopping it once listed: a process each, a
    second or so of a core to start. A run reads each task's splits, a few files each: on a 2-core
    box 32 per read held an evaluation of 4 tasks in one stream 35-38 s, one per read 24-26 s
    (benchmarks/evaluate_tasks.py). `read_parquet` reads the count from this process's
    environment when it plans the read.
    """
    return min(32, max(1, -(-files // FILES_PER_FOOTER_ACTOR)))


@dataclass
class Decoded:
    """Decoded rows of one task split: the model-input arrays and the rows whose image could not be read.

    `arrays`: numeric columns only (`Preprocessor` output less the task tag and ids), one row per
    row; out of the object store they are read-only zero-copy views. `errors`: row position ->
    message, for rows decoded with zero pixels (`data.skip_bad_images`); empty for good data.
    """

    arrays: dict[str, np.ndarray]
    errors: dict[int, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def without_errors(self) -> Decoded:
        """These rows less the unreadable ones."""
        if not self.errors:
            return self
        good = np.ones(len(self), bool)
        good[list(self.errors)] = False
        return Decoded({k: v[good] for k, v in self.arrays.items()})

    def owned(self) -> Decoded:
        """A copy in this process's memory (it outlives the Ray cluster that stored it)."""
        return Decoded({k: np.array(v) for k, v in self.arrays.items()}, dict(self.errors))


# One cached chunk: (task split key, its first row, its Decoded or an object ref to it).
Chunk = tuple[str, int, "ray.ObjectRef | Decoded"]


@dataclass
class TaskInputs:
    """What a worker needs to read any batch of any task: picklable, holds object refs.

    `sources`: raw table (input columns only) of each task split, by `dataset_key`; a large split's
    blocks as the cluster read them (`SourceBlocks`).
    `cached`: with `data.cache`, the decoded inputs as chunks of rows (`Chunk`).
    Both hold object refs, or the data itself where no Ray cluster runs (`in_process`).
    `max_bad_fraction`: the share of a rank's rows per split and epoch that may be dropped as
    unreadable (`data.max_bad_fraction`; the preprocessors mark them only with `skip_bad_images`).
    """

    preprocessors: dict[str, Preprocessor]
    sources: dict[str, ray.ObjectRef | pa.Table | SourceBlocks]
    rows: dict[str, int]
    cached: list[Chunk] | None = None
    max_bad_fraction: float = 0.0

    def in_process(self) -> TaskInputs:
        """These inputs with every table and chunk copied into this process's memory: they outlive
        the Ray cluster (what `ray.get` returns is a view of the object store's shared memory)."""
        cached = None
        if self.cached is not None:
            refs = [c for *_, c in self.cached]
            cached = [(key, start, d.owned()) for (key, start, _), d in zip(self.cached, _get_all(refs))]
        sources = {key: src.owned(_owned) if isinstance(src, SourceBlocks) else _owned(src)
                   for key, src in self.sources.items()}
        return dataclasses.replace(self, sources=sources, cached=cached)


def _put(table: pa.Table) -> ray.ObjectRef | pa.Table:
    """`table` in the object store when a Ray cluster runs here, else the table itself."""
    return ray.put(table) if ray.is_initialized() else table


def _table(ref: ray.ObjectRef | pa.Table) -> pa.Table:
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _get_all(values: list) -> list:
    """`values` with every object ref replaced by its object (one `ray.get` for all of them)."""
    refs = [v for v in values if isinstance(v, ray.ObjectRef)]
    got = iter(ray.get(refs) if refs else [])
    return [next(got) if isinstance(v, ray.ObjectRef) else v for v in values]


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
            table = SourceBlocks.read(read_source_parts(source, columns))  # by the cluster, never in this process
        else:  # read by inspection already (`tables.read_parts` keeps small files): not opened again
            table = arrow_table(read_table(source, columns))
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
        max_bad_fraction=exp.data.max_bad_fraction,
    )
    if cache:
        inputs.cached = _decode_all(inputs)
    return inputs


def _decode_all(inputs: TaskInputs) -> list[Chunk]:
    """Every task split decoded once, in chunks: in parallel Ray tasks, each chunk stored in the
    object store (nothing decoded comes back here), or, one decode task's rows or no cluster, right
    here without starting Ray tasks (their worker processes cost seconds and ~0.3 GB on a small box)."""
    preps = inputs.preprocessors
    chunks = [
        (key, start, min(start + _chunk_rows(preps[task_of(key)]), n))
        for key, n in inputs.rows.items()
        for start in range(0, n, _chunk_rows(preps[task_of(key)]))
    ]
    if sum(inputs.rows.values()) <= _CACHE_BLOCK_ROWS or not ray.is_initialized():
        return [(key, start, decode_rows(_table(inputs.sources[key]), np.arange(start, stop), preps[task_of(key)]))
                for key, start, stop in chunks]
    refs = [_decode_chunk.remote(inputs.sources[key], np.arange(start, stop), preps[task_of(key)])
            for key, start, stop in chunks]
    ray.get([bad for _, bad in refs])  # raises a failed decode task's error; moves no decoded bytes
    return [(key, start, decoded) for (key, start, _), (decoded, _) in zip(chunks, refs)]


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

    Preprocessing is deterministic, so each epoch would decode the very same inputs again. Every
    node that runs ranks holds the whole cache once in its object store (ranks read it zero-copy,
    so the ranks on a node share that one copy; over the epochs each rank reads every row), so
    "auto" keeps the inputs when they take at most a quarter of the smallest such node's store
    (without a cluster: of the store Ray would make here); larger data streams.
    `nbytes`: `decoded_nbytes`, the uint8 bytes really held.
    """
    if exp.data.cache != "auto":
        return exp.data.cache == "always"
    return nbytes <= _CACHE_SHARE * node_store(exp)


def node_store(exp: Experiment) -> float:
    """Object store bytes of the smallest live node that can host one of the run's ranks (its CPUs,
    GPU and `worker_resources`); without a cluster, the store Ray would make on this machine."""
    if not ray.is_initialized():
        return _DEFAULT_STORE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    tr = exp.training
    need = {"CPU": tr.cpus_per_worker, **({"GPU": 1.0} if tr.use_gpu else {}), **tr.worker_resources}
    stores = [
        node["Resources"].get("object_store_memory", 0.0)
        for node in ray.nodes()
        if node.get("Alive") and all(node["Resources"].get(k, 0.0) >= v for k, v in need.items())
    ]
    return min(stores, default=0.0)


def needs_ray(cache: bool, rows: int) -> bool:
    """Whether a run in this process needs a Ray cluster for its data: to stream it (no cache), or to
    decode a cache of more than one decode task's rows in parallel (then fetched, see `in_process`)."""
    return not cache or rows > _CACHE_BLOCK_ROWS


def _chunk_rows(prep: Preprocessor) -> int:
    return max(_MIN_CHUNK, min(_MAX_CHUNK, _TARGET_CHUNK_BYTES // prep.row_nbytes))


# ---------------------------------------------------------------- decoding (Ray tasks)


def decode_rows(source: pa.Table | SourceBlocks, rows: np.ndarray, prep: Preprocessor) -> Decoded:
    """Rows `rows` of a raw task table (a small split's table, or a large one's blocks) through its
    `Preprocessor`: the numeric arrays and the unreadable rows' messages (the task tag and ids are
    not model inputs)."""
    rows = np.asarray(rows, np.int64)
    raw = source.take(rows) if isinstance(source, SourceBlocks) else to_pandas(source.take(pa.array(rows)))
    out = prep(raw)
    errors = out.pop("error", None)
    bad = {} if errors is None else {i: str(m) for i, m in enumerate(errors) if m}
    return Decoded({k: v for k, v in out.items() if v.dtype.kind in "biuf"}, bad)


# Decode tasks run on any node's free CPUs, never in their caller's placement group: a Tune trial
# captures the tasks it starts into its own, whose one bundle the trial's process holds.
DECODE_TASK = {"num_cpus": 1, "scheduling_strategy": "DEFAULT"}


@ray.remote(**DECODE_TASK)
def _decode_step(source: pa.Table | SourceBlocks, rows: np.ndarray, prep: Preprocessor) -> Decoded:
    return decode_rows(source, rows, prep)


@ray.remote(**DECODE_TASK, num_returns=2)
def _decode_chunk(source: pa.Table | SourceBlocks, rows: np.ndarray, prep: Preprocessor) -> tuple[Decoded, int]:
    """A cached chunk, and its count of unreadable rows: small, for the driver to wait on."""
    decoded = decode_rows(source, rows, prep)
    return decoded, len(decoded.errors)


# ---------------------------------------------------------------- reading (in the workers)


def decode_slots(world: int, cpus_per_rank: float) -> int:
    """Decode tasks each rank keeps running: the cluster's CPUs not reserved for training (CPU-only
    nodes included), shared among the ranks; at least one."""
    free = ray.cluster_resources().get("CPU", 1.0) - world * cpus_per_rank
    return max(1, int(free // world))


@ray.remote(**DECODE_TASK)
def _warm_decoder(preprocessors: list[Preprocessor]) -> int:
    """Nothing decoded: running it loads this module (a decode task's imports) and what the
    preprocessors use (`Preprocessor.load`) into a worker process. Returns the tokenizers it holds."""
    try:
        return max(prep.load() for prep in preprocessors)
    except Exception:  # noqa: BLE001 -- the decode tasks meet it again, with the rows at fault
        return 0


def warm_decoders(inputs: TaskInputs, slots: int) -> list[ray.ObjectRef]:
    """Start the decode workers a stream of `slots` will use, with the decode path loaded, and
    return at once (their refs, for a caller that waits).

    A cold worker's first decode task otherwise pays for its process start and imports (~0.5 CPU-s
    each, more with a tokenizer): on 2 cores four cold workers' first tasks took 1.0-1.5 s against 0.9.
    The training loop warms them before it builds its model.
    """
    preprocessors = list(inputs.preprocessors.values())
    return [_warm_decoder.remote(preprocessors) for _ in range(slots + _PREFETCH_STEPS)]


def in_order(futures: Iterable[Any], window: int, get: Callable[[Any], T]) -> Iterator[T]:
    """The results of `futures` (started lazily, as they are drawn) in their own order: a bounded
    reorder buffer. At most `window` are started and not yet yielded; they finish in any order, and a
    slow one delays only its own turn while the others keep working."""
    futures = iter(futures)
    pending = deque(itertools.islice(futures, window))
    while pending:
        result = get(pending.popleft())
        pending.extend(itertools.islice(futures, 1))
        yield result


def stream(inputs: TaskInputs, split: str, steps: list[Step], slots: int) -> Iterator[Decoded]:
    """The decoded rows of every step, in plan order: one decode task per step, for all tasks of the
    plan, `slots` of them decoding and `_PREFETCH_STEPS` more waiting in the object store at most."""
    started = (
        _decode_step.remote(inputs.sources[dataset_key(s.task, split)], s.rows, inputs.preprocessors[s.task])
        for s in steps
    )
    return in_order(started, slots + _PREFETCH_STEPS, ray.get)


class DecodedCache:
    """Every task split's decoded inputs, read in place: on a Ray cluster its arrays are zero-copy
    views of this node's object store (one copy per node, shared by its ranks); a batch gathers its rows."""

    def __init__(self, chunks: list[Chunk]) -> None:
        parts: dict[str, list[tuple[int, Decoded]]] = {}
        for (key, start, _), decoded in zip(chunks, _get_all([c for *_, c in chunks])):
            parts.setdefault(key, []).append((start, decoded))
        self.parts = {key: [d for _, d in sorted(p, key=lambda x: x[0])] for key, p in parts.items()}
        self.starts = {key: np.array(sorted(s for s, _ in p)) for key, p in parts.items()}

    def gather(self, key: str, rows: np.ndarray) -> Decoded:
        """The decoded rows `rows` of one task split, in that order (fresh, writable arrays)."""
        parts, starts = self.parts[key], self.starts[key]
        which = np.searchsorted(starts, rows, side="right") - 1
        out = {name: np.empty((len(rows), *col.shape[1:]), col.dtype) for name, col in parts[0].arrays.items()}
        errors: dict[int, str] = {}
        for c in np.unique(which):
            at = np.flatnonzero(which == c)
            local = rows[at] - starts[c]
            for name, col in parts[c].arrays.items():
                out[name][at] = col[local]
            for pos, row in zip(at, local) if parts[c].errors else ():
                if int(row) in parts[c].errors:
                    errors[int(pos)] = parts[c].errors[int(row)]
        return Decoded(out, errors)
