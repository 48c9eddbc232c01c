"""Batch prediction at catalogue scale: a saved model over a table (or a folder) of items, on Ray Data
(or, for a few items, in this process).

    items ─► read, only the columns the model reads (parquet/CSV path, glob, URI, DataFrame,
    │        or a folder of images: one row per image, its path as id)
    ├──────► Prepare   CPU actors: the training `Preprocessor` (mark mode) once per image column and
    │                  once per text column, however many tasks read it; empty texts marked as bad
    ├──────► Predict   actor pool (a GPU per actor when the cluster has GPUs), the artifact loaded
    │                  once per actor; per task group (and inputs) one backbone pass over the rows
    │                  whose inputs are good, then each task's head on its features
    └──────► parquet   one row per item:

    id            string                                    the item's id (or image path)
    <task>        string | list<string>                     multiclass: the most probable label;
                                                            multilabel: labels over the threshold
    <task>_prob   float | list<float>                       their probabilities
    <task>_top_k  list<struct<label: string, score: float>> the k best labels (top_k > 0)
    error         string                                    why the row is bad; null when it is not

An input of at most `LOCAL_ROWS` items runs through the same two stages in this process and is
written as one parquet file, without starting Ray: the actors' start-up (seconds) would cost more
than its items. Options only actors take (GPUs, resources, pool growth, a cluster address), or a
cluster whose GPUs this process lacks, send any input to Ray.

Bad rows are never dropped: a row whose image is missing or unreadable, or whose text is empty, is
written with its `error` and null predictions for the tasks that read that input (a text-only task
still predicts an item whose image is missing), so rows out == rows in. `strict` fails the run on
the first bad row instead. Rows come out in no particular order: join on `id`.

This module runs it; its parts: `plan` (what to read and predict, made on the driver), `reading`
(the items as a Dataset, or a DataFrame here), `actors` (the two stages), `output` (a task's Arrow
columns).
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymtl import console, storage
from raymtl.errors import ConfigError
from raymtl.models.artifact import META_FILE
from raymtl.predict.actors import BadRowError, Predict, Prepare
from raymtl.predict.plan import ERROR, Plan, make_plan
from raymtl.predict.reading import items_here, read_items, source_images

if TYPE_CHECKING:  # Ray and torch come with the run, after the inputs are checked (see `check_paths`)
    from collections.abc import Callable, Iterator

    import pandas as pd
    import ray.data

LOCAL_ROWS = 1024  # `local` by default: an input (or a split to evaluate) of at most this many rows
# Decoding actors one joining GPU node adds at most: its CPUs beside its model actor (the shipped
# manifests' GPU pods have 7, aws-gpu.yaml's nodes 8); Ray Data starts them only as CPUs join.
DECODERS_PER_GPU_NODE = 6
ROWS_PER_FILE = 100_000  # output rows are ~100 bytes: files of ~10 MB, not one tiny file per batch
# Reason -> the phrase that marks it in an error message (Preprocessor's, and the empty-text check's).
REASONS = {"unreadable image": "cannot read image", "empty text": "empty text"}


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



def predict(
    model_path: str,
    input: Any,
    output: str,
    *,
    tasks: list[str] | None = None,
    batch_size: int = 64,
    pool_size: int = 1,
    max_pool_size: int | None = None,
    num_gpus: float | None = None,
    resources_per_actor: dict[str, float] | None = None,
    top_k: int = 0,
    strict: bool = False,
    image_column: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
    local: bool | None = None,
) -> PredictSummary:
    """Predict every task (or `tasks`) of a saved model for every item of `input`; write parquet to `output`.

    Columns default to the ones the model was trained with; `image_column`/`text_column`/`id_column`
    rename them for this input. `num_gpus` is per model actor, None = 1 when the cluster has GPUs;
    `resources_per_actor` adds custom resources per model actor (e.g. `{"inference": 1}`: only on
    the nodes that offer it, which an autoscaling cluster starts for the pool).
    The model actors start `pool_size` strong and grow to `max_pool_size` (default: `pool_size`)
    while items queue and the cluster has room (an autoscaling cluster adds nodes for them).
    `local`: the two stages in this process (on its GPU if it has one) instead of on Ray Data's
    actors; None: for an input of at most `LOCAL_ROWS` items, unless an option only actors take is
    given (`num_gpus`, `resources_per_actor`, `max_pool_size`, `address`) or the actors would have
    GPUs this process lacks (`actors_have_gpus`).
    """
    from raymtl.models.artifact import load
    from raymtl.ray_runtime import ensure_ray

    if batch_size < 1 or pool_size < 1 or top_k < 0 or (max_pool_size is not None and max_pool_size < pool_size):
        raise ConfigError(f"need batch_size >= 1, 1 <= pool_size <= max_pool_size, top_k >= 0; got {batch_size}, "
                          f"{pool_size}, {max_pool_size}, {top_k}")
    local = local_choice(local, {"num_gpus": num_gpus, "resources_per_actor": resources_per_actor,
                                 "max_pool_size": max_pool_size, "address": address})
    images = check_paths(model_path, input, output, overwrite)
    saved = load(model_path)
    plan = make_plan(model_path, saved, tasks=tasks, image_column=image_column, text_column=text_column,
                     id_column=id_column, strict=strict, top_k=top_k)
    if local is None and actors_have_gpus():
        local = False
    here = None if local is False else items_here(input, plan, None if local else LOCAL_ROWS, images)
    if here is None:
        del saved  # each model actor loads its own
        ensure_ray(address)
        items = read_items(input, plan, images)
        rows_in = items.count()
        pipeline = predictions(items, plan, batch_size, pool_size, gpus_per_actor(num_gpus),
                               max_pool_size=max_pool_size, resources=resources_per_actor, rows=rows_in)
        write = functools.partial(_write_parquet, pipeline, output, overwrite)
    else:
        rows_in = len(here)
        write = functools.partial(_write_here, here, plan, batch_size, output, overwrite, saved)
    if rows_in == 0:
        raise ConfigError(f"input {input!r} has no rows")
    if here is not None and local is None:
        console.say(f"[raymtl] {rows_in} items (at most {LOCAL_ROWS}): predicted in this process, without Ray "
                    "(--no-local: on Ray Data's actors)")
    start = time.perf_counter()
    _write(write, output)
    return summarise(output, rows_in, time.perf_counter() - start)


def local_choice(local: bool | None, for_actors: dict[str, Any]) -> bool | None:
    """`local`, False when an option only Ray's actors take is given (not None); `local=True` with
    one is a ConfigError naming both."""
    given = [name for name, value in for_actors.items() if value is not None]
    if local and given:
        raise ConfigError(f"local (--local) runs in this process, which takes no {', '.join(given)}: "
                          "those ask for Ray's actors; drop one or the other")
    return False if given else local


def actors_have_gpus() -> bool:
    """Whether Ray's actors would have GPUs this process lacks: those of the cluster it is connected
    to (joined first when RAY_ADDRESS names one, as in a submitted job); a local cluster it would
    start has this machine's. A few items are then scored faster on a GPU actor than on a head
    node's CPUs."""
    import ray
    import torch

    from raymtl.ray_runtime import ensure_ray

    if torch.cuda.is_available():
        return False
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return False
        ensure_ray()
    return ray.cluster_resources().get("GPU", 0) > 0


def check_paths(model_path: str, input: Any, output: str, overwrite: bool) -> list[str]:
    """The model folder, the input and a free output: named in a second, before torch and Ray load.
    The input's images when it is a folder of images (`source_images`)."""
    if not storage.exists(storage.join(storage.normalize(model_path), META_FILE)):
        raise ConfigError(f"{model_path!r} is not a raymtl model folder: it has no {META_FILE}")
    images = source_images(input)
    if storage.exists(output) and not overwrite:
        raise ConfigError(f"output {output!r} already exists; choose another path or overwrite it")
    return images


def predictions(
    items: ray.data.Dataset, plan: Any, batch_size: int, pool_size: int, gpus: float, model_stage: type | None = None,
    max_pool_size: int | None = None, resources: dict[str, float] | None = None, rows: int | None = None,
    prepare_stage: type | None = None,
) -> ray.data.Dataset:
    """Items -> output rows: decoding on CPU actors, then the model on a pool of `pool_size` to
    `max_pool_size` actors.

    `prepare_stage` and `model_stage` replace `Prepare` and `Predict` (constructors taking `plan`,
    and `plan, use_gpu`) to decode other rows or turn model outputs into other rows (evaluation:
    every task's rows in one stream); `resources`: custom resources per model actor; `rows`: the
    items' count, when the caller has it.
    """
    import ray.data

    # Blocks of one batch: a decode actor takes a block at a time, and a single input file read as
    # one block would otherwise be decoded by one actor while the others idle.
    return items.repartition(target_num_rows_per_block=batch_size).map_batches(
        prepare_stage or Prepare,
        fn_constructor_args=(plan,),
        batch_format="pandas",
        batch_size=batch_size,
        compute=_prepare_pool(pool_size, max_pool_size, items.count() if rows is None else rows, batch_size, gpus),
        udf_modifying_row_count=False,
    ).map_batches(
        model_stage or Predict,
        fn_constructor_args=(plan, gpus > 0),
        batch_format="numpy",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool_size, max_size=max(pool_size, max_pool_size or 0)),
        num_gpus=gpus,
        resources=resources,
        udf_modifying_row_count=False,
    )


def stages_here(
    items: pd.DataFrame, plan: Any, batch_size: int, model_stage: type | None = None, saved: Any = None,
    prepare_stage: type | None = None,
) -> Iterator:
    """Both stages (`prepare_stage` or `Prepare`, then `model_stage` or `Predict`: see `predictions`)
    called batch by batch in this process; `saved`: the model, when the caller has loaded it already."""
    import torch

    prepare = (prepare_stage or Prepare)(plan)
    model = (model_stage or Predict)(plan, torch.cuda.is_available(), saved)
    for start in range(0, len(items), batch_size):
        yield model(prepare(items.iloc[start : start + batch_size]))


def _write_parquet(predictions: ray.data.Dataset, output: str, overwrite: bool) -> None:
    import ray.data

    fs, path = storage.resolve(output)
    mode = ray.data.SaveMode.OVERWRITE if overwrite else ray.data.SaveMode.ERROR
    predictions.write_parquet(path, filesystem=fs, mode=mode, min_rows_per_file=ROWS_PER_FILE)


def _write_here(items: pd.DataFrame, plan: Plan, batch_size: int, output: str, overwrite: bool, saved: Any) -> None:
    """The items predicted in this process, written batch by batch into one parquet file in the
    `output` folder (as Ray Data's writer lays it out; an old one replaced)."""
    fs, path = storage.resolve(output)
    if overwrite and fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    fs.create_dir(path)
    writer = None
    try:
        for table in stages_here(items, plan, batch_size, saved=saved):
            writer = writer or pq.ParquetWriter(f"{path.rstrip('/')}/part-00000.parquet", table.schema, filesystem=fs)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _write(write: Callable[[], None], output: str) -> None:
    """Run `write`, which writes parquet to `output`.

    A failed run leaves no output (with `overwrite`, not the old one either) rather than a partial
    one that a downstream job could take for complete.
    """
    fs, path = storage.resolve(output)
    try:
        write()
    except BaseException as e:  # Ctrl-C too: a file closed early would look complete
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        bad_row = _bad_row(e) if isinstance(e, Exception) else None
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


def gpus_per_actor(num_gpus: float | None) -> float:
    """`num_gpus`, or by default 1 when the cluster has a GPU now; running on CPU by default is said."""
    if num_gpus is not None:
        return num_gpus
    import ray

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return 1.0
    console.say("[raymtl] the cluster has no GPU now: the model runs on CPU "
                "(--num-gpus 1 asks for GPU actors; an autoscaling cluster then starts GPU nodes for them)")
    return 0.0


def _prepare_pool(pool_size: int, max_pool_size: int | None, rows: int, batch_size: int, gpus: float = 0.0):
    """Decoding actors: at first the CPUs left by the model actors and one for the read and write
    tasks, at most one per batch of the input; growing with the model pool in proportion (to at most
    one per batch), so the nodes that join for model actors also decode for them. When the cluster
    lacks the GPUs of the model pool (an autoscaling cluster at rest: its nodes join for the model
    actors), the CPUs now say nothing of those nodes: each model actor may bring `DECODERS_PER_GPU_NODE`.

    The first ones start at once: grown from one on demand, the first GPU check's pool was still one
    actor with a third of the items done (78 items/s on 16 cores), and the model waited.
    """
    import ray

    batches = -(-rows // batch_size)
    now = ray.cluster_resources()
    first = max(1, min(int(now.get("CPU", 1)) - pool_size - 1, batches))
    models = max(pool_size, max_pool_size or 0)
    most = -(-first * models // pool_size)
    if gpus and now.get("GPU", 0) < gpus * models:
        most = max(most, DECODERS_PER_GPU_NODE * models)
    return ray.data.ActorPoolStrategy(min_size=first, max_size=max(first, min(batches, most)))
