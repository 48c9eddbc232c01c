"""Batch prediction at catalogue scale: a saved model over a table (or a folder) of items, on Ray Data.

    items ─► read, only the columns the model reads (parquet/CSV path, glob, URI, DataFrame,
    │        or a folder of images: one row per image, its path as id)
    ├──────► _Prepare  CPU actors: the training `Preprocessor` (mark mode) once per image column and
    │                  once per text column, however many tasks read it; empty texts marked as bad
    ├──────► _Predict  actor pool (a GPU per actor when the cluster has GPUs), the artifact loaded
    │                  once per actor; per task group (and inputs) one backbone pass over the rows
    │                  whose inputs are good, then each task's head on its features
    └──────► parquet   one row per item:

    id            string                                    the item's id (or image path)
    <task>        string | list<string>                     multiclass: the most probable label;
                                                            multilabel: labels over the threshold
    <task>_prob   float | list<float>                       their probabilities
    <task>_top_k  list<struct<label: string, score: float>> the k best labels (top_k > 0)
    error         string                                    why the row is bad; null when it is not

Bad rows are never dropped: a row whose image is missing or unreadable, or whose text is empty, is
written with its `error` and null predictions for the tasks that read that input (a text-only task
still predicts an item whose image is missing), so rows out == rows in. `strict` fails the run on
the first bad row instead. Rows come out in no particular order: join on `id`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from raymtl import storage
from raymtl.config import DataSpec, TaskSpec
from raymtl.errors import ConfigError, did_you_mean
from raymtl.data.tables import TaskInfo, check_columns, source_paths
from raymtl.data.transforms import Preprocessor
from raymtl.models.artifact import META_FILE

if TYPE_CHECKING:  # Ray and torch come with the run, after the inputs are checked (see `check_paths`)
    import ray.data

    from raymtl.models.artifact import SavedModel

ID, ERROR, LABEL = "id", "error", "label"
ROWS_PER_FILE = 100_000  # output rows are ~100 bytes: files of ~10 MB, not one tiny file per batch
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Reason -> the phrase that marks it in an error message (Preprocessor's, and `_empty_texts`').
REASONS = {"unreadable image": "cannot read image", "empty text": "empty text"}


class BadRowError(ConfigError):
    """A bad input row in a strict run; the message names the row's id and what is wrong."""


@dataclass
class PredictSummary:
    """What a prediction run did: rows in and out, bad rows (total and by reason), where, how fast."""

    rows_in: int
    rows_out: int
    bad_rows: int
    bad_by_reason: dict[str, int]  # a row with a bad image and an empty text counts under both
    output: str
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.rows_out / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.bad_by_reason.items() if n)
        bad = f"{self.bad_rows} bad row{'s' * (self.bad_rows != 1)} ({reasons})" if self.bad_rows else "no bad rows"
        return (
            f"predicted {self.rows_out} of {self.rows_in} items in {self.seconds:.1f} s "
            f"({self.items_per_s:.1f} items/s), {bad} -> {self.output}"
        )


@dataclass(frozen=True)
class Input:
    """One model input read from the items: an image column (every view of it) or a text column."""

    kind: str  # image | text
    column: str | None  # None: an image task whose views all name their own columns
    tasks: tuple[str, ...]  # the tasks that read it (they share its decoding and its errors)

    def preprocessor(self, data: DataSpec) -> Preprocessor:
        """The training transform restricted to this input, named after the tasks that read it."""
        image, text = self.kind == "image", self.kind == "text"
        name = ",".join(self.tasks)
        spec = TaskSpec(name, train=None, image_column=self.column if image else None,
                        text_column=self.column if text else None)
        info = TaskInfo(name, "multiclass", [], 0, 0, has_image=image, has_text=text)  # labels unused
        return Preprocessor(spec, info, data, with_labels=False, on_bad="mark")


@dataclass(frozen=True)
class Head:
    """What turns one task's probabilities into its output columns."""

    task: str
    kind: str
    labels: tuple[str, ...]
    threshold: float
    inputs: tuple[int, ...]  # indices into the plan's inputs


@dataclass(frozen=True)
class Plan:
    """Everything the two stages need, built once on the driver (small and picklable)."""

    model_path: str  # absolute local path or URI
    data: DataSpec
    inputs: tuple[Input, ...]
    heads: tuple[Head, ...]
    id_column: str
    strict: bool
    top_k: int
    label_column: str | None = None  # evaluation: also encode this column as the (single) head's labels

    def preprocessors(self, data: DataSpec) -> list[Preprocessor]:
        """One per input; `data` is the plan's with the tokenizer folder of the node it runs on."""
        return [inp.preprocessor(data) for inp in self.inputs]

    @property
    def required_columns(self) -> dict[str, str]:
        """Column -> what names it, for every column the run reads (the id first)."""
        columns = {self.id_column: "id_column"}
        if self.label_column:
            columns[self.label_column] = "label_column"
        for inp, prep in zip(self.inputs, self.preprocessors(self.data)):
            columns.update({c: f"{inp.kind}_column" for c in prep.input_columns if c not in columns})
        return columns


# ---------------------------------------------------------------- the run


def predict(
    model_path: str,
    input: Any,
    output: str,
    *,
    tasks: list[str] | None = None,
    batch_size: int = 64,
    pool_size: int = 1,
    num_gpus: float | None = None,
    top_k: int = 0,
    strict: bool = False,
    image_column: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
) -> PredictSummary:
    """Predict every task (or `tasks`) of a saved model for every item of `input`; write parquet to `output`.

    Columns default to the ones the model was trained with; `image_column`/`text_column`/`id_column`
    rename them for this input. `num_gpus` is per model actor, None = 1 when the cluster has GPUs.
    """
    from raymtl.models.artifact import load
    from raymtl.ray_runtime import ensure_ray

    if batch_size < 1 or pool_size < 1 or top_k < 0:
        raise ConfigError(f"need batch_size >= 1, pool_size >= 1, top_k >= 0; got {batch_size}, {pool_size}, {top_k}")
    check_paths(model_path, input, output, overwrite)
    plan = make_plan(model_path, load(model_path), tasks=tasks, image_column=image_column, text_column=text_column,
                     id_column=id_column, strict=strict, top_k=top_k)
    ensure_ray(address)
    items = read_items(input, plan)
    rows_in = items.count()
    if rows_in == 0:
        raise ConfigError(f"input {input!r} has no rows")
    start = time.perf_counter()
    _write(predictions(items, plan, batch_size, pool_size, _gpus_per_actor(num_gpus)), output, overwrite)
    return summarise(output, rows_in, time.perf_counter() - start)


def check_paths(model_path: str, input: Any, output: str, overwrite: bool) -> None:
    """The model folder, the input and a free output: named in a second, before torch and Ray load."""
    if not storage.exists(storage.join(storage.normalize(model_path), META_FILE)):
        raise ConfigError(f"{model_path!r} is not a raymtl model folder: it has no {META_FILE}")
    if isinstance(input, (str, os.PathLike)):
        try:
            source_paths(input)
        except ConfigError:
            if not image_files(input):
                raise
    if storage.exists(output) and not overwrite:
        raise ConfigError(f"output {output!r} already exists; choose another path or overwrite it")


def predictions(
    items: ray.data.Dataset, plan: Plan, batch_size: int, pool_size: int, gpus: float, model_stage: type | None = None
) -> ray.data.Dataset:
    """Items -> output rows: decoding on CPU actors, then the model on a pool of `pool_size` actors.

    `model_stage` replaces `_Predict` (same constructor) to turn model outputs into other rows.
    """
    import ray.data

    return items.map_batches(
        _Prepare,
        fn_constructor_args=(plan,),
        batch_format="pandas",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_prepare_actors(pool_size)),
        udf_modifying_row_count=False,
    ).map_batches(
        model_stage or _Predict,
        fn_constructor_args=(plan, gpus > 0),
        batch_format="numpy",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool_size),
        num_gpus=gpus,
        udf_modifying_row_count=False,
    )


def _write(predictions: ray.data.Dataset, output: str, overwrite: bool) -> None:
    """Write parquet to `output`.

    A failed run leaves no output (with `overwrite`, not the old one either) rather than a partial
    one that a downstream job could take for complete.
    """
    import ray.data

    fs, path = storage.resolve(output)
    mode = ray.data.SaveMode.OVERWRITE if overwrite else ray.data.SaveMode.ERROR
    try:
        predictions.write_parquet(path, filesystem=fs, mode=mode, min_rows_per_file=ROWS_PER_FILE)
    except Exception as e:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        bad_row = _bad_row(e)
        if bad_row is None:
            raise
        raise bad_row from e


def _bad_row(error: Exception) -> BadRowError | None:
    """The BadRowError of a strict run: Ray Data hands the driver only the worker's traceback text."""
    found = re.search(rf"{BadRowError.__name__}: (.+)", str(error))
    return BadRowError(found.group(1)) if found else None


def summarise(output: str, rows_in: int, seconds: float) -> PredictSummary:
    """Count what was written: rows out, and bad rows by reason from the `error` column alone."""
    fs, path = storage.resolve(output)
    written = pads.dataset(path, filesystem=fs, format="parquet")
    rows_out = written.count_rows()
    if rows_out != rows_in:  # the contract of the whole module: never lose a row
        raise RuntimeError(f"read {rows_in} items but wrote {rows_out} predictions to {output!r}")
    errors = written.to_table(columns=[ERROR], filter=pc.field(ERROR).is_valid()).column(ERROR)
    by_reason = {reason: int(pc.sum(pc.match_substring(errors, phrase)).as_py() or 0)
                 for reason, phrase in REASONS.items()}
    return PredictSummary(rows_in, rows_out, len(errors), by_reason, output, seconds)


# ---------------------------------------------------------------- planning (driver)


def make_plan(
    model_path: str,
    saved: SavedModel,
    *,
    tasks: list[str] | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    strict: bool = False,
    top_k: int = 0,
    label_column: str | None = None,
) -> Plan:
    """The plan of a run of the model `saved` (loaded from `model_path`); faults named before Ray runs."""
    specs = task_specs(saved.experiment, saved.infos, tasks, image_column=image_column, text_column=text_column)
    inputs = plan_inputs(specs, saved.infos)
    return Plan(
        model_path=storage.normalize(model_path),
        data=saved.data,
        inputs=tuple(inputs),
        heads=tuple(_head(saved.infos[name], inputs) for name in specs),
        id_column=_id_column(specs, id_column),
        strict=strict,
        top_k=top_k,
        label_column=label_column,
    )


def task_specs(
    experiment: dict[str, Any],
    infos: dict[str, TaskInfo],
    tasks: list[str] | None = None,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
) -> dict[str, TaskSpec]:
    """Column names of each task to predict: the ones it was trained with, unless overridden.

    A task the stored experiment does not list (kept from a base model) reads the columns its
    other tasks read.
    """
    trained = {t["name"]: t for t in experiment.get("tasks", [])}
    shared = {key: next((t[key] for t in trained.values() if t.get(key)), None)
              for key in ("image_column", "text_column", "id_column")}
    specs = {}
    for name in tasks or list(infos):
        if name not in infos:
            raise ConfigError(f"unknown task {name!r}{did_you_mean(name, infos)}; the model's tasks are {list(infos)}")
        info, own = infos[name], {k: v for k, v in trained.get(name, {}).items() if v is not None}
        column = {**shared, **own, **{k: v for k, v in (("image_column", image_column),
                                                           ("text_column", text_column)) if v}}
        spec = TaskSpec(name, train=None, kind=info.kind, id_column=column["id_column"],
                        image_column=column["image_column"] if info.has_image else None,
                        text_column=column["text_column"] if info.has_text else None)
        if info.has_text and spec.text_column is None:
            raise ConfigError(f"task {name!r} reads text but the model records no text column; pass text_column")
        specs[name] = spec
    return specs


def plan_inputs(specs: dict[str, TaskSpec], infos: dict[str, TaskInfo]) -> list[Input]:
    """The distinct inputs of the tasks: each image column decoded, each text column tokenized once."""
    readers: dict[tuple[str, str | None], list[str]] = {}
    for name, spec in specs.items():
        if infos[name].has_image:
            readers.setdefault(("image", spec.image_column), []).append(name)
        if infos[name].has_text:
            readers.setdefault(("text", spec.text_column), []).append(name)
    return [Input(kind, column, tuple(tasks)) for (kind, column), tasks in readers.items()]


def _head(info: TaskInfo, inputs: list[Input]) -> Head:
    used = tuple(i for i, inp in enumerate(inputs) if info.name in inp.tasks)
    return Head(info.name, info.kind, tuple(info.labels), info.threshold, used)


def _id_column(specs: dict[str, TaskSpec], id_column: str | None) -> str:
    """The item id: `id_column`, else the trained tasks' id column, else the image path."""
    candidates = [id_column, *(s.id_column for s in specs.values()), *(s.image_column for s in specs.values())]
    found = next((c for c in candidates if c), None)
    if found is None:
        raise ConfigError("the items have no id column the model knows of; pass id_column")
    return found


def _gpus_per_actor(num_gpus: float | None) -> float:
    if num_gpus is not None:
        return num_gpus
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _prepare_actors(pool_size: int) -> int:
    """Most decoding actors: the CPUs left by the model actors and one for the read and write tasks."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) - pool_size - 1)


# ---------------------------------------------------------------- reading


def read_items(source: Any, plan: Plan) -> ray.data.Dataset:
    """The items as a Dataset of the columns the plan reads, checked before anything runs.

    A table source (see `read_source`) is read as is; a folder without tables but with images
    becomes one row per image, its path in the id and image columns (and no text).
    """
    import ray.data

    from raymtl.data.datasets import read_source

    columns = plan.required_columns
    try:
        items = read_source(source)
    except ConfigError:
        images = image_files(source) if isinstance(source, (str, os.PathLike)) else []
        if not images:
            raise
        text = {inp.column for inp in plan.inputs if inp.kind == "text"}
        return ray.data.from_items([{c: None if c in text else path for c in columns} for path in images])
    where = "the DataFrame" if isinstance(source, pd.DataFrame) else repr(os.fspath(source))
    check_columns(items.schema().names, columns, where)
    return items.select_columns(list(columns))


def image_files(folder: str | os.PathLike) -> list[str]:
    """Image files below `folder` (sorted local paths or URIs); [] when it is not a folder."""
    folder = os.fspath(folder)
    fs, root = storage.resolve(folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_SUFFIXES))
    if not storage.is_uri(folder):
        return paths
    return [folder.rstrip("/") + p[len(root.rstrip("/")):] for p in paths]


# ---------------------------------------------------------------- the two stages (actors)


class _Prepare:
    """Raw item rows -> every input's model arrays (keys "<input index>/<key>"), ids and errors.

    A CPU actor: it fetches the model's tokenizer once when that is not on its node (the driver
    alone downloads a URI model).
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.preprocessors = plan.preprocessors(_local_tokenizer(plan.data, plan.model_path))
        self.labels = _label_encoder(plan) if plan.label_column else None

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        plan = self.plan
        batch = batch.reset_index(drop=True)
        out: dict[str, np.ndarray] = {ID: batch[plan.id_column].astype(str).to_numpy(dtype=object)}
        for i, (inp, prep) in enumerate(zip(plan.inputs, self.preprocessors)):
            arrays = prep(batch)
            if inp.kind == "text":
                arrays[ERROR] = _empty_texts(batch[inp.column], inp)
            out.update({f"{i}/{key}": value for key, value in arrays.items() if key != "task"})
        if self.labels is not None:
            out[LABEL] = self.labels(batch)[LABEL]
        out[ERROR] = _join_errors([out[f"{i}/{ERROR}"] for i in range(len(plan.inputs))])
        bad = np.flatnonzero(out[ERROR] != "")
        if plan.strict and len(bad):
            raise BadRowError(f"bad row {plan.id_column}={out[ID][bad[0]]!r}: {out[ERROR][bad[0]]}")
        return out


def _label_encoder(plan: Plan) -> Preprocessor:
    """The training transform reading only the label column of the plan's one task."""
    (head,) = plan.heads
    spec = TaskSpec(head.task, train=None, label_column=plan.label_column)
    info = TaskInfo(head.task, head.kind, list(head.labels), 0, 0, has_image=False, has_text=False)
    return Preprocessor(spec, info, plan.data)


def _local_tokenizer(data: DataSpec, model_path: str) -> DataSpec:
    """`data` with a tokenizer folder on this node, fetched from the model folder if missing here."""
    if data.tokenizer is None or Path(data.tokenizer).is_dir():
        return data
    from raymtl.models.artifact import TOKENIZER_DIR

    local = tempfile.mkdtemp(prefix="raymtl_tokenizer_")
    return dataclasses.replace(data, tokenizer=storage.download_dir(storage.join(model_path, TOKENIZER_DIR), local))


def _empty_texts(texts: pd.Series, inp: Input) -> np.ndarray:
    """Per row "" or why the text is unusable: missing or only whitespace."""
    empty = texts.fillna("").astype(str).str.strip().eq("").to_numpy()
    message = f"task {','.join(inp.tasks)!r}: empty text in column {inp.column!r}"
    return np.where(empty, message, "").astype(object)


def _join_errors(errors: list[np.ndarray]) -> np.ndarray:
    """One message per row from the per-input messages ("" for a good row)."""
    return np.array(["; ".join(m for m in row if m) for row in zip(*errors)], dtype=object)


class _Predict:
    """Model actor: loads the artifact (every member of an ensemble) once; per batch, one backbone
    pass per member, task group and inputs."""

    def __init__(self, plan: Plan, use_gpu: bool) -> None:
        import torch

        from raymtl.models.artifact import load

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = load(plan.model_path).model.to(self.device)
        self.heads, self.top_k = plan.heads, plan.top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns = {ID: pa.array(batch[ID], pa.string())}
        features: dict[tuple, object] = {}  # tasks of one group with the same inputs share one pass
        for head in self.heads:
            bad = np.zeros(len(batch[ID]), dtype=bool)
            for i in head.inputs:
                bad |= batch[f"{i}/{ERROR}"] != ""
            columns.update(output_columns(head, self._probs(head, batch, ~bad, features), bad, self.top_k))
        errors = batch[ERROR]
        columns[ERROR] = pa.array(errors, pa.string(), mask=errors == "")
        return pa.table(columns)

    def _probs(self, head: Head, batch: dict[str, np.ndarray], good: np.ndarray, features: dict) -> np.ndarray:
        """Softmax (multiclass) or sigmoid (multilabel) probabilities; zeros on bad rows.

        An ensemble's are its members' weighted mean. `features` caches the fused features per
        (member, feature key, good rows) within one batch.
        """
        import torch

        from raymtl.models.ensemble import members_of, probabilities

        probs = np.zeros((len(good), len(head.labels)), np.float32)
        if not good.any():
            return probs
        prefixes = tuple(f"{i}/" for i in head.inputs)
        inputs = {k.split("/", 1)[1]: torch.as_tensor(value[good]).to(self.device)
                  for k, value in batch.items() if k.startswith(prefixes) and not k.endswith(f"/{ERROR}")}
        total = 0.0
        with torch.inference_mode():
            for k, (weight, member) in enumerate(members_of(self.model)):
                key = (k, member.feature_key(head.task), good.tobytes())
                if key not in features:
                    features[key] = member.features(inputs, head.task)
                total = total + weight * probabilities(member.heads[head.task](features[key]), head.kind)
        probs[good] = total.cpu().numpy()
        return probs


# ---------------------------------------------------------------- output columns


def output_columns(head: Head, probs: np.ndarray, bad: np.ndarray, top_k: int) -> dict[str, pa.Array]:
    """<task> and <task>_prob (and <task>_top_k) of one task; null on bad rows.

    Multiclass: the most probable label and its probability. Multilabel: the labels whose sigmoid
    is above the task's threshold (strictly, as in the validation metrics), in label-map order,
    and their probabilities.
    """
    labels = np.asarray(head.labels, dtype=object)
    if head.kind == "multiclass":
        best = probs.argmax(1)
        columns = {
            head.task: pa.array(labels[best], pa.string(), mask=bad),
            f"{head.task}_prob": pa.array(probs[np.arange(len(best)), best], pa.float32(), mask=bad),
        }
    else:
        chosen = (probs > head.threshold) & ~bad[:, None]
        rows, cols = np.nonzero(chosen)
        offsets = np.concatenate([[0], np.cumsum(chosen.sum(1))])
        columns = {
            head.task: _lists(offsets, pa.array(labels[cols], pa.string()), bad),
            f"{head.task}_prob": _lists(offsets, pa.array(probs[rows, cols], pa.float32()), bad),
        }
    if top_k:
        columns[f"{head.task}_top_k"] = _top_k(labels, probs, bad, min(top_k, len(labels)))
    return columns


def _top_k(labels: np.ndarray, probs: np.ndarray, bad: np.ndarray, k: int) -> pa.Array:
    """list<struct<label: string, score: float>>, best first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probs, order, axis=1)
    pairs = pa.StructArray.from_arrays(
        [pa.array(labels[order.ravel()], pa.string()), pa.array(scores.ravel(), pa.float32())],
        names=["label", "score"],
    )
    return _lists(np.arange(0, (len(probs) + 1) * k, k), pairs, bad)


def _lists(offsets: np.ndarray, values: pa.Array, bad: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pa.array(bad))
