"""Source tables: the files a source names (file, directory, glob, URI) and reading them.

A source is a parquet or CSV file, a glob of them (local path or a URI that
`pyarrow.fs.FileSystem.from_uri` understands), or a pandas DataFrame (Python API). Each file is
read in the format its own name says, a CSV's cells as the text written in them. Faults name the
file or column (a `ConfigError`); checking a task's tables against its config is `raymtl.data.inspection`'s job.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymtl import storage
from raymtl.errors import ConfigError, did_you_mean


# ---------------------------------------------------------------- files

# `?` starts a URI's query string, so only `*` and `[` are glob characters in URIs.
_LOCAL_MAGIC = re.compile(r"[*?\[]")
_URI_MAGIC = re.compile(r"[*\[]")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_COMPRESSIONS = (".gz", ".bz2", ".br", ".lz4", ".zst")  # what Arrow opens by the name (compression="detect")
HEADER_READERS = 16  # files whose footer or header `check_source` reads at once


def source_files(source: str | os.PathLike) -> list[str]:
    """Files of a file/directory/glob/URI source, sorted: absolute local paths or full URIs."""
    _, files = _expand(source)
    return [name for _, name in files]


def source_paths(source: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the paths inside it of every file a source names (for Ray Data)."""
    fs, files = _expand(source)
    return fs, [path for path, _ in files]


def _expand(source: Any) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """The filesystem and (path inside it, user-facing name) of every file a source names.

    Globs match one path component per pattern component; a directory stands for every
    .parquet/.csv file below it. Names starting with `.` or `_` (Spark's `_SUCCESS`, `.crc`,
    `_temporary`) are skipped, as pyarrow datasets do.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"expected a file path, glob or URI string (or a DataFrame), got {type(source).__name__}")
    text = os.fspath(source)
    is_uri = "://" in text
    if not is_uri:
        text = os.path.abspath(os.path.expanduser(text))
    base, pattern = _split_glob(text, is_uri)
    fs, base_path = _filesystem(base, is_uri)
    found = _glob(fs, base_path, pattern) if pattern else _file_or_directory(fs, base_path, text)
    if not found:
        what = "matches no files" if pattern else "is a directory without .parquet or .csv files"
        raise ConfigError(f"{text!r} {what}")
    return fs, [(p, base.rstrip("/") + p[len(base_path.rstrip("/")):]) for p in found]


def _split_glob(text: str, is_uri: bool) -> tuple[str, list[str]]:
    """'/data/*/part-*.pq' -> ('/data', ['*', 'part-*.pq']); no glob -> (text, [])."""
    magic = _URI_MAGIC if is_uri else _LOCAL_MAGIC
    parts = text.split("/")
    first = next((i for i, part in enumerate(parts) if magic.search(part)), len(parts))
    return "/".join(parts[:first]) or "/", parts[first:]


def _filesystem(base: str, is_uri: bool) -> tuple[pafs.FileSystem, str]:
    if not is_uri:
        return pafs.LocalFileSystem(), base
    try:
        return storage.resolve(base)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ConfigError(f"cannot open {base!r}: {e}") from None


def _file_or_directory(fs: pafs.FileSystem, path: str, name: str) -> list[str]:
    """[path] for a file, the data files below it for a directory (Spark/Hive output)."""
    with _reading(name):
        kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise ConfigError(f"file {name!r} does not exist")
    if kind != pafs.FileType.Directory:
        return [path]
    return sorted(
        info.path
        for info in _listdir(fs, path, recursive=True)
        if info.type == pafs.FileType.File
        and _file_format(info.path)
        and not any(part.startswith((".", "_")) for part in info.path[len(path) :].split("/"))
    )


def _glob(fs: pafs.FileSystem, base: str, pattern: list[str]) -> list[str]:
    """Files under `base` matching `pattern`, expanded one directory level per component."""
    matches = [base]
    for depth, part in enumerate(pattern):
        want = pafs.FileType.File if depth == len(pattern) - 1 else pafs.FileType.Directory
        matches = [
            info.path
            for directory in matches
            for info in _listdir(fs, directory)
            if info.type == want
            and not info.base_name.startswith((".", "_"))
            and fnmatch.fnmatchcase(info.base_name, part)
        ]
    return sorted(matches)


def _listdir(fs: pafs.FileSystem, directory: str, recursive: bool = False) -> list[pafs.FileInfo]:
    with _reading(directory):
        return fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True, recursive=recursive))


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """Turn an I/O or format failure while reading `name` into a ConfigError naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"cannot read {name!r}: {e}") from None


def _file_format(name: str) -> str | None:
    suffixes = PurePosixPath(name).suffixes
    if suffixes and suffixes[-1] in PARQUET_SUFFIXES:
        return "parquet"
    if suffixes[-1:] == [".csv"] or suffixes[-2:-1] == [".csv"] and suffixes[-1] in CSV_COMPRESSIONS:
        return "csv"
    return None


def file_format(name: str) -> str:
    """'parquet' or 'csv' by the file's own name; anything else is a ConfigError."""
    fmt = _file_format(name)
    if fmt is None:
        raise ConfigError(f"unsupported file type {name!r}: expected .parquet/.pq or .csv, optionally compressed "
                          f"({'/'.join(CSV_COMPRESSIONS)})")
    return fmt


def _file_columns(fs: pafs.FileSystem, path: str, name: str) -> list[str]:
    """Column names from the parquet footer or the CSV header, without reading the rows."""
    with _reading(name):
        if file_format(name) == "parquet":
            return pq.read_schema(path, filesystem=fs).names
        with fs.open_input_stream(path) as stream:
            return pacsv.open_csv(stream).schema.names


def csv_convert(columns: list[str], select: bool = True) -> pacsv.ConvertOptions:
    """Arrow's options reading a CSV's `columns` (only those, if `select`) as the text written in each
    cell; a cell Arrow reads as null in any column (empty, `NA`, `null`, `N/A`, ...: its default markers)
    is missing. Typed by their values, labels 1.1 and 1.10 would be one float (two classes
    merged), 02134 the float 2134.0 and an id 007 the int 7."""
    return pacsv.ConvertOptions(include_columns=columns if select else [], strings_can_be_null=True,
                                column_types=dict.fromkeys(columns, pa.string()))


def _read_file(fs: pafs.FileSystem, path: str, name: str, columns: list[str] | None) -> pa.Table:
    """A file's rows (only `columns` if given): the one place that reads them whole."""
    with _reading(name):
        if file_format(name) == "parquet":
            return pq.read_table(path, columns=columns, filesystem=fs)
        options = csv_convert(_file_columns(fs, path, name) if columns is None else columns)
        with fs.open_input_stream(path) as stream:
            return pacsv.read_csv(stream, convert_options=options)


def _batches(fs: pafs.FileSystem, path: str, name: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """A file's `columns`, one record batch at a time (as `_read_file` reads them)."""
    with _reading(name):
        if file_format(name) == "parquet":
            yield from pq.ParquetFile(path, filesystem=fs).iter_batches(columns=columns)
        else:
            with fs.open_input_stream(path) as stream:
                yield from pacsv.open_csv(stream, convert_options=csv_convert(columns))


# ---------------------------------------------------------------- files read once per process

# Sources up to this size on disk are read by the driver, once, and kept for every reader of the run
# (inspection, the image pre-flight, the task inputs): checks before Ray starts need their rows.
# Larger sources are never read whole here: inspection streams their label column one record batch
# at a time, and the cluster reads their input columns (`datasets.read_source_parts`).
DRIVER_READ_BYTES = 256 << 20
_kept: OrderedDict[tuple, pa.Table] = OrderedDict()  # (path, size, mtime) -> the columns read so far
_kept_lock = threading.Lock()  # the task inputs read their splits on several threads


def _file_table(fs: pafs.FileSystem, info: pafs.FileInfo, name: str, columns: list[str]) -> pa.Table:
    """`columns` of a small file, read on first use and kept (least recently used out past
    DRIVER_READ_BYTES); a file that changed on disk (size, mtime) is read again."""
    key = (fs.type_name, info.path, info.size, info.mtime_ns)
    with _kept_lock:
        table = _kept.get(key)
    if table is None or not set(columns) <= set(table.column_names):
        wanted = list(dict.fromkeys([*(table.column_names if table is not None else []), *columns]))
        table = _read_file(fs, info.path, name, wanted)
    with _kept_lock:
        _kept[key] = table
        _kept.move_to_end(key)
        while len(_kept) > 1 and sum(t.nbytes for t in _kept.values()) > DRIVER_READ_BYTES:
            _kept.popitem(last=False)
    return table.select(columns)


def is_small(source: Any, most_bytes: int | None = None) -> bool:
    """Whether the driver reads `source` (a DataFrame is in memory already; files: at most
    `most_bytes`, default DRIVER_READ_BYTES, on disk)."""
    if isinstance(source, pd.DataFrame):
        return True
    fs, files = _expand(source)
    return sum(i.size or 0 for i in _infos(fs, files)) <= (DRIVER_READ_BYTES if most_bytes is None else most_bytes)


def _infos(fs: pafs.FileSystem, files: list[tuple[str, str]]) -> list[pafs.FileInfo]:
    with _reading(files[0][1]):
        return fs.get_file_info([path for path, _ in files])


def label_batches(source: Any, column: str) -> Iterator[tuple[str, int, pd.Series]]:
    """(file name, first row, values) of `column`, one record batch at a time: a large source's
    labels checked without holding the column."""
    fs, files = _expand(source)
    for path, name in files:
        start = 0
        for batch in _batches(fs, path, name, [column]):
            yield name, start, to_pandas(batch.column(0))
            start += batch.num_rows


def head_rows(source: Any, columns: list[str], rows: int) -> pd.DataFrame:
    """The first `rows` rows of `columns` of a large source (an image sample), past files without
    rows (Spark's output may start with empty parts); a ConfigError naming the source if it has none."""
    fs, files = _expand(source)
    parts, taken = [], 0
    batches = (batch for path, name in files for batch in _batches(fs, path, name, columns) if batch.num_rows)
    for batch in batches:
        parts.append(to_pandas(batch.slice(0, rows - taken)))
        taken += len(parts[-1])
        if taken >= rows:
            break
    if not parts:
        raise ConfigError(f"{os.fspath(source)!r} has no rows")
    return concat_files(parts)


# ---------------------------------------------------------------- tables


def read_table(source: Any, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a whole source (file, glob, URI or DataFrame) into pandas, only `columns` if given."""
    required = {c: "column" for c in columns or []}
    return concat_files([df for _, df in read_parts(source, columns, required)])


def concat_files(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames read from several files, as one. A column whose type differs between them (numeric ids
    in one parquet file, alphanumeric in the next; a CSV's text beside a parquet's numbers) becomes
    each value's text, as inspection and the preprocessor read every raw column (`str(value)`)."""
    for name in frames[0].columns if len(frames) > 1 else ():
        if len({str(f[name].dtype) for f in frames}) > 1:
            frames = [f.assign(**{name: f[name].astype(str)}) for f in frames]
    return pd.concat(frames, ignore_index=True)


def arrow_table(frame: pd.DataFrame) -> pa.Table:
    """A DataFrame as Arrow. A column Arrow cannot type (an object column mixing numbers and words,
    [1, "other"], which only a DataFrame source holds: files are typed as they are read) becomes text,
    as inspection reads it: each value's `str` (nulls kept), or each list's label names (`label_names`)."""
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        frame = frame.copy(deep=False)  # the caller's frame keeps its columns
    for name in frame.columns:
        try:
            pa.array(frame[name], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frame[name] = _as_text(frame[name])
    return pa.Table.from_pandas(frame, preserve_index=False)


def _as_text(values: pd.Series) -> pd.Series:
    """A column of scalars as their text, or of lists as their label names, one list per row."""
    if not values.map(lambda cell: isinstance(cell, (list, tuple, np.ndarray))).any():
        return values.map(str, na_action="ignore")
    rows, names = label_names(values, multilabel=True)
    lists = np.split(names, np.searchsorted(rows, np.arange(1, len(values))))
    return pd.Series([list(part) for part in lists], index=values.index, dtype=object)


def label_names(values: pd.Series, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every label of a label column: (its row, its name). The one way cells become label names, for
    inspection's label maps and the preprocessor's encoding alike.

    A label's name is its text (`str(value)`; a CSV's cells are read as text, `csv_convert`). A
    multilabel cell is a list of labels, a null element no label (a missing tag); a multilabel cell
    that is not a list is one label, a null cell none.
    """
    values = values.reset_index(drop=True)
    if multilabel:
        values = values.explode().dropna()
    return values.index.to_numpy(), np.array([str(v) for v in values], dtype=object)


def to_pandas(data: pa.Table | pa.Array | pa.ChunkedArray) -> Any:
    """Arrow data as pandas, integers holding a null kept as integers (objects), not made floats: a
    list of tags [1, None] would otherwise name every tag of its file '1.0' (Ray Data's own pandas
    batches, Arrow-backed, keep integers too)."""
    return data.to_pandas(integer_object_nulls=True)


def read_parts(
    source: Any, columns: list[str] | None, required: dict[str, str]
) -> list[tuple[str, pd.DataFrame]]:
    """(name, frame) per file, reading `columns` once every file is known to have `required`.

    `required` maps column -> the config field that names it, so a missing column is reported
    as e.g. "text_column 'titel'" rather than a bare KeyError. A small source's files are read
    once per process with every `required` column (`_file_table`): the run's other readers ask
    for those same columns, and get them without opening the file again.
    """
    if isinstance(source, pd.DataFrame):
        check_columns(list(source.columns), required, "the DataFrame")
        return [("the DataFrame", source if columns is None else source[columns])]
    fs, files = check_source(source, required)
    infos = _infos(fs, files)
    if columns is None or sum(i.size or 0 for i in infos) > DRIVER_READ_BYTES:
        return [(name, to_pandas(_read_file(fs, path, name, columns))) for path, name in files]
    keep = list(dict.fromkeys([*required, *columns]))
    return [(name, to_pandas(_file_table(fs, info, name, keep).select(columns)))
            for info, (_, name) in zip(infos, files)]


def check_source(source: Any, required: dict[str, str]) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """The files of a file/glob/URI source, each checked to have the `required` columns (by its
    parquet footer or CSV header, without reading rows): the filesystem and (path, name) per file.

    The footers are read concurrently (one request each in an object store, a many-part source's
    latency otherwise adds up); a fault is reported for the first file in order that has one."""
    fs, files = _expand(source)
    with ThreadPoolExecutor(max_workers=HEADER_READERS) as pool:
        for (_, name), columns in zip(files, pool.map(lambda file: _file_columns(fs, *file), files)):
            check_columns(columns, required, name)
    return fs, files


def check_columns(available: list[str], required: dict[str, str], where: str) -> None:
    """Every `required` column ({column: its role}) is in `available`, else a ConfigError naming `where`."""
    for column, role in required.items():
        if column not in available:
            hint = did_you_mean(column, available)
            listed = ", ".join(map(str, available))
            raise ConfigError(f"{role} {column!r} not found in {where}{hint}; available columns: {listed}")
