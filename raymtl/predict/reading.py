"""The items to predict as a Ray Dataset: a table source, or a folder of images (one row per image)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.fs as pafs

from raymtl import storage
from raymtl.data.tables import check_columns
from raymtl.errors import ConfigError
from raymtl.predict.plan import Plan

if TYPE_CHECKING:
    import ray.data

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
