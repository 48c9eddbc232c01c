"""The benchmark data loaders (benchmarks/data_sources.py) on tiny stand-ins, no Debian packages needed."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import lzma
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "data_sources.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_data_sources", _PATH)
ds = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ds)

N_TRAIN, N_TEST = 60, 30


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: 0x0000, type code 0x08 (ubyte), ndim, big-endian uint32 dims, then the data."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """Fashion-MNIST's four files, gzipped as Debian ships them; item k has category k % 10."""
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (tmp_path / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return tmp_path


def test_read_idx_raw_and_gzipped(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(idx_bytes(array))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        np.testing.assert_array_equal(ds.read_idx(tmp_path / name), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an idx file"):
        ds.read_idx(tmp_path / "bad")


def test_load_fashion_mnist_shapes(fashion_dir: Path) -> None:
    data = ds.load_fashion_mnist(fashion_dir)
    assert data["train"][0].shape == (N_TRAIN, 28, 28) and data["train"][0].dtype == np.uint8
    assert data["test"][0].shape == (N_TEST, 28, 28)
    np.testing.assert_array_equal(np.bincount(data["train"][1]), [N_TRAIN // 10] * 10)


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(ds.MissingDataError, match="apt-get install -y dataset-fashion-mnist"):
        ds.load_fashion_mnist(tmp_path)


def test_fashion_tasks_are_disjoint_and_labelled_from_the_category(fashion_dir: Path, tmp_path: Path) -> None:
    data = ds.load_fashion_mnist(fashion_dir)
    train, val = {"category": 20, "coarse": 15, "sleeves": 12}, {"category": 8, "coarse": 8, "sleeves": 6}
    tables = ds.fashion_tables(data, tmp_path / "images", train, val, seed=1)
    for split, sizes in (("train", train), ("val", val)):
        ids = [set(tables[task][split]["id"]) for task in sizes]
        assert sum(map(len, ids)) == len(set().union(*ids)), f"{split}: an item is in two tasks"
        for task, n in sizes.items():
            table = tables[task][split]
            assert list(table.columns) == ["id", "image", "label"] and len(table) == n
            source = "train" if split == "train" else "test"
            category = data[source][1][[int(i.rsplit("-", 1)[1]) for i in table["id"]]]
            assert list(table["label"]) == [ds.FASHION_TASKS[task][c] for c in category]
    assert "Dress" not in set(tables["sleeves"]["train"]["label"]) and not (
        set(tables["sleeves"]["train"]["id"]) & {f"fmnist-train-{i:05d}" for i in range(3, N_TRAIN, 10)}
    )
    assert set(tables["coarse"]["train"]["label"]) <= {"tops", "bottoms", "dresses", "footwear", "bags"}
    first = tables["category"]["train"].iloc[0]
    source_index = int(first["id"].rsplit("-", 1)[1])
    np.testing.assert_array_equal(np.asarray(Image.open(first["image"])), data["train"][0][source_index])


def test_disjoint_subsets_run_out_loudly() -> None:
    categories = np.arange(20) % 10
    with pytest.raises(ValueError, match="asked for 19 items, 18 are left"):  # 2 dresses have no sleeves label
        ds.disjoint_subsets(categories, {"sleeves": 19}, seed=0)
    with pytest.raises(ValueError, match="asked for 11 items, 10 are left"):
        ds.disjoint_subsets(categories, {"category": 10, "coarse": 11}, seed=0)


@pytest.mark.parametrize("compressed,kind", [(1, b""), (3, b"Z"), (2, b"2"), (3, b"0")])
def test_decompress_lazyload_block(compressed: int, kind: bytes) -> None:
    data = b"X\n" + bytes(range(256)) * 4
    payload = {
        b"": zlib.compress,
        b"Z": lambda d: lzma.compress(d, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]),
        b"2": bz2.compress,
        b"0": bytes,
    }[kind](data)
    assert ds.decompress_block(struct.pack(">I", len(data)) + kind + payload, compressed) == data
    with pytest.raises(ValueError, match="header says"):
        ds.decompress_block(struct.pack(">I", len(data) + 1) + kind + payload, compressed)


def test_missing_modeldata_and_rdata_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ds.MissingDataError, match="apt-get download r-cran-modeldata"):
        ds.modeldata_index(tmp_path)
    package = tmp_path / "usr/lib/R/site-library/modeldata/data"
    package.mkdir(parents=True)
    (package / "Rdata.rdx").write_bytes(b"")
    (package / "Rdata.rdb").write_bytes(b"")
    assert ds.modeldata_index(tmp_path) == package / "Rdata.rdx"
    monkeypatch.setitem(sys.modules, "rdata", None)
    with pytest.raises(ds.MissingDataError, match="pip install rdata"):
        ds.read_lazyload(package / "Rdata.rdx", ["training_data"])


def test_review_tables_from_parsed_frames() -> None:
    """The part after rdata: small_fine_foods' tibbles arrive as (product, review, score) frames."""

    def frame(n: int) -> pd.DataFrame:
        score = pd.Categorical(["great", "other"] * (n // 2), categories=["great", "other"])
        return pd.DataFrame({"product": [f"B{i:09d}" for i in range(n)], "review": [f"review {i}" for i in range(n)], "score": score})

    tables = ds.review_tables({"train": frame(40), "val": frame(20)}, {"train": 30, "val": 10}, seed=0)
    assert {split: len(t) for split, t in tables.items()} == {"train": 30, "val": 10}
    for split, table in tables.items():
        assert list(table.columns) == ["id", "text", "label"]
        assert set(table["label"]) == {"great", "other"} and table["id"].is_unique
        assert all(text.startswith("review ") for text in table["text"])
    assert not set(tables["train"]["id"]) & set(tables["val"]["id"])
    with pytest.raises(ValueError, match="asked for 50 rows"):
        ds.review_tables({"train": frame(40)}, {"train": 50})


def test_write_tables(tmp_path: Path) -> None:
    table = pd.DataFrame({"id": ["a"], "text": ["t"], "label": ["great"]})
    paths = ds.write_tables({"train": table, "val": table}, tmp_path, "review")
    assert Path(paths["val"]).name == "review_val.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(paths["train"]), table)
