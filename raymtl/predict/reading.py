"""The items to predict: a table source, or a folder of images (one row per image); as a Ray Dataset,
or as a DataFrame in this process when there are few."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.fs as pafs

from raymtl import storage
from raymtl.data.tables import check_columns, check_source, concat_files, is_small, read_parts, source_paths
from raymtl.errors import ConfigError
from raymtl.predict.plan import Plan

if TYPE_CHECKING:
    import ray.data

# A table source at most this large on disk is read to count its rows (rows of a few hundred bytes:
# thousands); a larger one goes to Ray, uncounted (footers would cost a request per file).
SMALL_BYTES = 8 << 20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def source_images(source: Any) -> list[str]:
    """[] for a table source (a DataFrame, or files `source_paths` finds); else the images of the
    folder `source`, a ConfigError naming it when it has neither tables nor images. A run lists
    the folder once, here, and hands the list to `read_items` or `items_here`."""
    if isinstance(source, pd.DataFrame):
        return []
    try:
        source_paths(source)
        return []
    except ConfigError:
        images = image_files(source) if isinstance(source, (str, os.PathLike)) else []
        if not images:
            raise
        return images


def read_items(source: Any, plan: Plan, images: list[str] | None = None) -> ray.data.Dataset:
    """The items as a Dataset of the columns the plan reads, checked before anything runs.

    A table source (see `read_source`) is read for those columns only; a folder without tables but with images
    (`images`: `source_images`, when the caller has it) becomes one row per image, its path in the
    id and image columns (and no text).
    """
    import ray.data

    from raymtl.data.datasets import read_source

    images = source_images(source) if images is None else images
    if images:
        return ray.data.from_items(_image_rows(images, plan))
    if isinstance(source, pd.DataFrame):
        check_columns(list(source.columns), plan.required_columns, "the DataFrame")
    else:  # every file's footer or header, naming the file: its other columns are never read
        check_source(source, plan.required_columns)
    return read_source(source, list(plan.required_columns))


def items_here(source: Any, plan: Plan, most: int | None, images: list[str] | None = None) -> pd.DataFrame | None:
    """The items as `read_items` has them, read into this process; None when there are more than
    `most` (None: no limit). Table files over SMALL_BYTES on disk are not read to count their rows."""
    images = source_images(source) if images is None else images
    columns = plan.required_columns
    if images:
        items = pd.DataFrame(_image_rows(images, plan))
    elif isinstance(source, pd.DataFrame):
        if most is not None and len(source) > most:
            return None
        check_columns(list(source.columns), columns, "the DataFrame")
        items = source[list(columns)]
    elif most is not None and not is_small(source, SMALL_BYTES):
        return None
    else:
        items = concat_files([df for _, df in read_parts(source, list(columns), columns)])
    return None if most is not None and len(items) > most else items.reset_index(drop=True)


def _image_rows(images: list[str], plan: Plan) -> list[dict[str, str | None]]:
    """One row per image: its path in the id and image columns, no text."""
    text = {inp.column for inp in plan.inputs if inp.kind == "text"}
    return [{c: None if c in text else path for c in plan.required_columns} for path in images]


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
    return [storage.join(folder, p[len(root.rstrip("/")):].lstrip("/")) for p in paths]
