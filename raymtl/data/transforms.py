"""Raw task rows -> model inputs: the one transform shared by training and batch prediction.

`Preprocessor` turns a pandas batch of raw rows into a dict of numpy arrays:

    task            str               [N]            the task name, on every row
    label           int64 [N] (multiclass) | float32 [N, num_labels] (multilabel multi-hot)
    view_<name>     uint8             [N, S, S, 3]   one per `data.views` view: NHWC pixels, as decoded
    input_ids       int32             [N, max_length]
    attention_mask  uint8             [N, max_length]
    id              str               [N]
    error           str               [N]            on_bad="mark" only; "" for good rows

Each key is present only when it applies (labels asked for, the task has images/text/ids).
Images stay uint8 and token ids narrow integers: a quarter of float32's bytes through the object
store, the network and the host-to-device copy. Normalisation (mean/std) happens on the device
the model runs on (`raymtl.data.device_inputs`), for training and prediction alike.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from raymtl import storage
from raymtl.config import ConfigError, DataSpec, TaskSpec, ViewSpec
from raymtl.data import image_io
from raymtl.data.tables import label_names
from raymtl.data.task_info import TaskInfo
from raymtl.errors import DataError

logger = logging.getLogger(__name__)

ON_BAD = ("raise", "skip", "mark")
# What a missing, truncated, corrupt or oversized image raises (PIL and pyarrow alike). A remote read that kept
# failing for a passing reason raises `storage.TransientReadError`, none of these: in training it fails the task,
# not the row.
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(DataError):
    """An image that cannot be read; the message names the task, column and path."""


class Preprocessor:
    """Turns one task's raw rows (a pandas batch) into the model-input dict of numpy arrays.

    Holds only column names and small settings, so pickling it into every Ray task is cheap
    (never the task's DataFrame sources); the tokenizer and filesystems are cached per process.
    `on_bad` decides what an unreadable image does: "raise" (fail the job), "skip" (drop the
    row, log a warning) or "mark" (keep the row with zero images and an `error` message).
    """

    def __init__(
        self,
        task: TaskSpec,
        info: TaskInfo,
        data: DataSpec,
        *,
        with_labels: bool = True,
        on_bad: str = "raise",
        retried: bool = True,
    ) -> None:
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        if info.has_text and not data.tokenizer:
            raise ConfigError(f"task {task.name!r} has text ({task.text_column!r}) but data.tokenizer is not set")
        self.task = task.name
        self.kind = info.kind
        self.labels = list(info.labels)
        self.on_bad = on_bad
        # A remote read that kept failing for a passing reason fails the decode where a retry from a
        # checkpoint follows (training, `retried`); elsewhere (prediction) it is the row's error.
        self.unreadable = _BAD_IMAGE_ERRORS if retried else (*_BAD_IMAGE_ERRORS, storage.TransientReadError)
        self.label_column = task.label_column if with_labels else None
        self.text_column = task.text_column if info.has_text else None
        self.id_column = task.id_column
        self.views = [_resolve_view(v, task) for v in data.views] if info.has_image else []
        self.image_size = data.image_size
        self.tokenizer = data.tokenizer
        self.max_length = data.max_length
        self.read_concurrency = data.read_concurrency

    def load(self) -> int:
        """Load, once per process, what decoding uses beyond its imports (a text task's tokenizer), so
        that a warmed decode worker (`datasets.warm_decoders`) spends no first task on it. Returns the
        tokenizers this process holds."""
        if self.text_column is not None:
            load_tokenizer(self.tokenizer)
        return load_tokenizer.cache_info().currsize

    @property
    def input_columns(self) -> list[str]:
        """The raw columns this transform reads: select them before anything else."""
        cols = [self.id_column, self.label_column, *(v.column for v in self.views), self.text_column]
        return list(dict.fromkeys(c for c in cols if c is not None))

    @property
    def row_nbytes(self) -> int:
        """Output bytes per row (uint8 pixels, int32 ids + uint8 mask, the label: int64, or a multilabel
        task's float32 multi-hot row, and overhead), for sizing."""
        label = 0 if self.label_column is None else 4 * len(self.labels) if self.kind == "multilabel" else 8
        return 3 * self.image_size**2 * len(self.views) + (5 * self.max_length if self.text_column else 0) + label + 64

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        batch = batch.reset_index(drop=True)
        pixels, errors = self._read_images(batch)
        if self.on_bad == "skip":
            batch, pixels, errors = self._drop_bad(batch, pixels, errors)
        out: dict[str, np.ndarray] = {"task": np.full(len(batch), self.task, dtype=object)}
        if self.label_column is not None:
            out["label"] = self._encode_labels(batch[self.label_column])
        for name, p in pixels.items():
            out[f"view_{name}"] = p  # bad rows stay zero
        if self.text_column is not None:
            out.update(self._tokenize(batch[self.text_column]))
        if self.id_column is not None:
            out["id"] = batch[self.id_column].astype(str).to_numpy(dtype=object)
        if self.on_bad == "mark":
            out["error"] = errors
        return out

    # ------------------------------------------------------------ images

    def _read_images(self, batch: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Decode each image once per column and cut every view of it: uint8 [N, S, S, 3] per view."""
        n, size = len(batch), self.image_size
        pixels = {v.name: np.zeros((n, size, size, 3), np.uint8) for v in self.views}
        errors = np.full(n, "", dtype=object)
        by_column: dict[str, list[ViewSpec]] = defaultdict(list)
        for v in self.views:
            by_column[v.column].append(v)
        for column, views in by_column.items():
            min_side = math.ceil(size / min(v.crop for v in views))
            uris = batch[column].to_numpy()
            todo = np.flatnonzero(errors == "")
            # reads overlap (remote round trips), decoding stays on this thread, in row order
            for i, data in zip(todo, image_io.read_all(uris[todo], self.read_concurrency)):
                try:
                    if isinstance(data, Exception):
                        raise data
                    image = decode_image(data, min_side)
                    for v in views:
                        pixels[v.name][i] = _crop_resize(image, v.crop, size)
                except self.unreadable as e:
                    errors[i] = f"task {self.task!r}: cannot read image {uris[i]!r} in column {column!r}: {type(e).__name__}: {e}"
                    if self.on_bad == "raise":
                        raise BadImageError(errors[i]) from e
        return pixels, errors

    def _drop_bad(
        self, batch: pd.DataFrame, pixels: dict[str, np.ndarray], errors: np.ndarray
    ) -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
        good = errors == ""
        if good.all():
            return batch, pixels, errors
        logger.warning(
            "skipped %d of %d rows with unreadable images: %s",
            (~good).sum(), len(batch), "; ".join(errors[~good][:5]),
        )
        return batch[good].reset_index(drop=True), {k: p[good] for k, p in pixels.items()}, errors[good]

    # ------------------------------------------------------------ labels, text

    def _encode_labels(self, values: pd.Series) -> np.ndarray:
        """Label names (`tables.label_names`, as inspection named them) -> class ids, or multi-hot rows
        for list-valued multilabel cells."""
        rows, names = label_names(values, self.kind == "multilabel")
        codes = pd.Index(self.labels).get_indexer(names)
        if (codes < 0).any():
            bad = names[int(np.argmax(codes < 0))]
            raise ConfigError(
                f"task {self.task!r}: unknown label {bad!r} in column {self.label_column!r}; "
                f"known labels: {self.labels[:20]}"
            )
        if self.kind != "multilabel":
            return codes.astype(np.int64)
        hot = np.zeros((len(values), len(self.labels)), np.float32)
        hot[rows, codes] = 1.0
        return hot

    def _tokenize(self, texts: pd.Series) -> dict[str, np.ndarray]:
        strings = texts.astype(object).where(texts.notna(), "").astype(str).tolist()
        enc = load_tokenizer(self.tokenizer)(
            strings, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {"input_ids": np.asarray(enc["input_ids"], np.int32),
                "attention_mask": np.asarray(enc["attention_mask"], np.uint8)}


def _resolve_view(view: ViewSpec, task: TaskSpec) -> ViewSpec:
    column = view.column or task.image_column
    if column is None:
        raise ConfigError(f"task {task.name!r}: view {view.name!r} has no column and the task no image_column")
    return ViewSpec(view.name, column, view.crop)


def _crop_resize(image: Image.Image, crop: float, size: int) -> np.ndarray:
    """Square centre crop of `crop` x the shorter side, resized to size x size (one PIL call)."""
    w, h = image.size
    side = max(1, round(min(w, h) * crop))
    left, top = (w - side) // 2, (h - side) // 2
    # crop first: resize(box=...) lets the antialiasing filter reach pixels outside the box
    cropped = image.crop((left, top, left + side, top + side))
    return np.asarray(cropped.resize((size, size), Image.Resampling.BILINEAR))


# ------------------------------------------------------------ per-process caches


def load_image(uri: Any, min_side: int = 0) -> Image.Image:
    """Read a local path, filesystem URI or http(s) URL as RGB (see `decode_image`)."""
    return decode_image(image_io.read_image_bytes(uri), min_side)


def decode_image(data: bytes, min_side: int = 0) -> Image.Image:
    """An encoded image's bytes as RGB.

    JPEGs decode at the smallest power-of-two scale that keeps both sides >= `min_side`
    (PIL draft mode): several times faster, and the pixels are resized down anyway. 16-bit grey
    images (modes "I;16", "I;16B"...: a 16-bit PNG or TIFF) keep their top 8 bits: PIL's RGB
    conversion would clip them at 255, nearly white. A 32-bit "I" image has no known range: PIL
    converts it (a pinned Pillow >= 10.3 opens 16-bit PNGs as "I;16", not "I"). A photo is turned
    upright by its EXIF orientation, as viewers show it (a phone stores a portrait photo landscape).
    """
    image = Image.open(io.BytesIO(data))
    if min_side:
        image.draft("RGB", (min_side, min_side))
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image.convert("RGB")


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer at a local path, loaded once per worker process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
