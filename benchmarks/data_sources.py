"""Real benchmark data from Debian packages (no hub downloads): Fashion-MNIST images, food reviews.

Image tasks come from Fashion-MNIST (`apt-get install -y dataset-fashion-mnist`: gzipped idx files
under /usr/share/datasets/fashion-mnist). As in a real catalogue every task labels its OWN items:
the images are dealt out to the tasks without overlap, each task taking only items its label is
defined for.

  category  the 10 Fashion-MNIST classes
  coarse    tops / bottoms / dresses / footwear / bags
  sleeves   yes / no (dresses, sleeved or not, are left out)

The text task is the Amazon fine-food reviews sample of R's modeldata package (`small_fine_foods`:
`training_data` 4000 and `testing_data` 1000 reviews, score "great" or "other"). Debian's
r-cran-modeldata holds it in an R lazy-load database (data/Rdata.rdx + Rdata.rdb); the index and
the objects are R serialisations, read with the PyPI package `rdata`.

  review    review text -> score class
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CATEGORIES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Each task's label per category id; None = undefined, such items never go to that task.
FASHION_TASKS: dict[str, tuple[str | None, ...]] = {
    "category": CATEGORIES,
    "coarse": ("tops", "bottoms", "tops", "dresses", "tops", "footwear", "tops", "footwear", "bags", "footwear"),
    "sleeves": ("yes", "no", "yes", None, "yes", "no", "yes", "no", "no", "no"),
}

MODELDATA_DIR = Path("/usr/lib/R/site-library/modeldata")
MODELDATA_INSTALL = (
    "apt-get update && apt-get download r-cran-modeldata && dpkg -x r-cran-modeldata_*.deb /tmp/modeldata "
    "(then pass /tmp/modeldata), or `apt-get install -y r-cran-modeldata` (brings R along)"
)
REVIEW_OBJECTS = {"train": "training_data", "val": "testing_data"}

# idx type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MissingDataError(FileNotFoundError):
    """A benchmark data set (or the package that reads it) is not installed; says how to install it."""


# ---------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """An idx file (raw or gzipped): magic 0x0000 + type code + ndim, big-endian uint32 dims, data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values for dims {dims}")
    return data.reshape(dims).astype(data.dtype.newbyteorder("="))


def _idx_path(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise MissingDataError(f"Fashion-MNIST file {stem}[.gz] not found in {root}; install it with: {FASHION_INSTALL}")


def load_fashion_mnist(root: Path = FASHION_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images uint8 [N, 28, 28], category ids [N]), "test": (...)}."""
    out = {}
    for split, (images, labels) in FASHION_FILES.items():
        x, y = read_idx(_idx_path(root, images)), read_idx(_idx_path(root, labels))
        if x.ndim != 3 or y.shape != x.shape[:1]:
            raise ValueError(f"{root}: {split} images {x.shape} do not match labels {y.shape}")
        out[split] = (x, y.astype(np.int64))
    return out


def disjoint_subsets(categories: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Item indices per task: no item in two tasks, a task only gets items its label is defined for."""
    pool = np.random.default_rng(seed).permutation(len(categories))
    taken = np.zeros(len(categories), dtype=bool)
    out = {}
    for task, n in sizes.items():
        defined = np.array([label is not None for label in FASHION_TASKS[task]])
        free = pool[~taken[pool] & defined[categories[pool]]]
        if len(free) < n:
            raise ValueError(f"task {task!r}: asked for {n} items, {len(free)} are left")
        out[task] = free[:n]
        taken[out[task]] = True
    return out


def fashion_tables(
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    image_dir: Path,
    train_sizes: dict[str, int],
    val_sizes: dict[str, int],
    seed: int = 0,
) -> dict[str, dict[str, pd.DataFrame]]:
    """task -> {"train", "val"} tables (id, image path, label); PNGs written to `image_dir`.

    Train rows come from Fashion-MNIST's train set, validation rows from its test set.
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    tables: dict[str, dict[str, pd.DataFrame]] = {task: {} for task in train_sizes}
    for split, source, sizes in (("train", "train", train_sizes), ("val", "test", val_sizes)):
        images, categories = data[source]
        for task, idx in disjoint_subsets(categories, sizes, seed).items():
            ids = [f"fmnist-{source}-{i:05d}" for i in idx]
            paths = [_write_png(images[i], image_dir / f"{item}.png") for i, item in zip(idx, ids)]
            labels = np.array(FASHION_TASKS[task], dtype=object)[categories[idx]]
            tables[task][split] = pd.DataFrame({"id": ids, "image": paths, "label": labels.astype(str)})
    return tables


def _write_png(pixels: np.ndarray, path: Path) -> str:
    if not path.exists():
        Image.fromarray(pixels).save(path, format="PNG")
    return str(path.absolute())


# ---------------------------------------------------------------- fine-food reviews


def modeldata_index(root: Path = MODELDATA_DIR) -> Path:
    """data/Rdata.rdx of the modeldata R package: installed, or unpacked with `dpkg -x` under `root`."""
    for package in (root, root / "usr/lib/R/site-library/modeldata"):
        if (package / "data/Rdata.rdx").is_file() and (package / "data/Rdata.rdb").is_file():
            return package / "data/Rdata.rdx"
    raise MissingDataError(f"R package modeldata (data/Rdata.rdx, .rdb) not found under {root}; get it with: {MODELDATA_INSTALL}")


def _rdata():
    try:
        import rdata
    except ImportError:
        raise MissingDataError("reading R data needs the PyPI package rdata: .venv/bin/pip install rdata") from None
    return rdata


def decompress_block(block: bytes, compressed: int) -> bytes:
    """One object of an R lazy-load database (.rdb): big-endian length, then the payload.

    compressed=1: zlib; 2 and 3 (bzip2, xz databases): a type byte first, which says how this
    object is stored ('Z' raw LZMA2 stream, '2' bzip2, '1' zlib, '0' as is).
    """
    (length,) = struct.unpack(">I", block[:4])
    if compressed == 1:
        data = zlib.decompress(block[4:])
    elif compressed in (2, 3):
        kind, payload = block[4:5], block[5:]
        if kind == b"Z":
            data = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
        elif kind in (b"2", b"1", b"0"):
            data = {b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}[kind](payload)
        else:
            raise ValueError(f"unknown R compression type {kind!r}")
    else:
        raise ValueError(f"unknown lazy-load compression {compressed}")
    if len(data) != length:
        raise ValueError(f"R object of {len(data)} bytes, its header says {length}")
    return data


def read_lazyload(rdx: Path, names: list[str]) -> dict[str, pd.DataFrame]:
    """Objects `names` of the lazy-load database `rdx` (+ its .rdb) as converted by rdata."""
    rdata = _rdata()
    index = rdata.conversion.convert(rdata.parser.parse_file(rdx, extension=".rds"))
    blob = rdx.with_suffix(".rdb").read_bytes()
    out = {}
    for name in names:
        if name not in index["variables"]:
            raise KeyError(f"{rdx}: no object {name!r}")
        offset, length = (int(v) for v in index["variables"][name])
        raw = decompress_block(blob[offset : offset + length], int(np.asarray(index["compressed"]).item()))
        with warnings.catch_warnings():  # tibbles convert as data frames: "Missing constructor for tbl_df"
            warnings.simplefilter("ignore", UserWarning)
            out[name] = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
    return out


def load_fine_foods(root: Path = MODELDATA_DIR) -> dict[str, pd.DataFrame]:
    """{"train": training_data, "val": testing_data} of small_fine_foods (product, review, score)."""
    objects = read_lazyload(modeldata_index(root), list(REVIEW_OBJECTS.values()))
    return {split: objects[name] for split, name in REVIEW_OBJECTS.items()}


def review_tables(frames: dict[str, pd.DataFrame], sizes: dict[str, int], seed: int = 0) -> dict[str, pd.DataFrame]:
    """{"train", "val"} tables (id, text, label) of `sizes[split]` reviews drawn from each split."""
    out = {}
    for split, df in frames.items():
        if sizes[split] > len(df):
            raise ValueError(f"reviews ({split}): asked for {sizes[split]} rows, {len(df)} exist")
        rows = np.random.default_rng([seed, len(out)]).permutation(len(df))[: sizes[split]]
        pick = df.iloc[rows]
        out[split] = pd.DataFrame(
            {
                "id": [f"review-{split}-{i:05d}" for i in rows],
                "text": pick["review"].astype(str).to_numpy(),
                "label": pick["score"].astype(str).to_numpy(),
            }
        )
    return out


def write_tables(tables: dict[str, pd.DataFrame], out: Path, task: str) -> dict[str, str]:
    """`out/<task>_<split>.parquet` for each split; returns split -> path."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, df in tables.items():
        paths[split] = str((out / f"{task}_{split}.parquet").absolute())
        df.to_parquet(paths[split], index=False)
    return paths
