"""Each source file is read once per run by the driver: inspection, the image pre-flight and the task
inputs share that one read; a large source is not read whole by the driver at all."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from PIL import Image

from raymtl import preflight
from raymtl.config import load_experiment
from raymtl.data import datasets, tables
from raymtl.data.source_blocks import SourceBlocks


@pytest.fixture
def catalogue(tmp_path: Path) -> dict:
    """Two tasks, train + validation each, train split over two parquet files; 12 images."""
    for i in range(12):
        Image.new("RGB", (12, 10), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    frame = pd.DataFrame({"id": [f"i{i}" for i in range(12)], "image": [str(tmp_path / f"{i}.png") for i in range(12)],
                          "label": ["a", "b", "c"] * 4, "unused": ["x" * 100] * 12})
    (tmp_path / "color").mkdir()
    frame.iloc[:5].to_parquet(tmp_path / "color" / "part-0.parquet", index=False)
    frame.iloc[5:9].to_parquet(tmp_path / "color" / "part-1.parquet", index=False)
    frame.iloc[9:].to_csv(tmp_path / "color_val.csv", index=False)
    frame.to_parquet(tmp_path / "size.parquet", index=False)
    frame.iloc[:6].to_parquet(tmp_path / "size_val.parquet", index=False)
    return {
        "name": "once", "storage_path": str(tmp_path / "runs"),
        "tasks": [
            {"name": "color", "train": str(tmp_path / "color"), "validation": str(tmp_path / "color_val.csv"),
             "image_column": "image", "id_column": "id"},
            {"name": "size", "train": str(tmp_path / "size.parquet"), "validation": str(tmp_path / "size_val.parquet"),
             "image_column": "image"},
        ],
        "data": {"image_size": 8, "cache": "never"},
        "training": {"batch_size": 2},
    }


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """Rows read per file (by name), counted at the one function that reads a file's rows."""
    counted: Counter = Counter()
    real = tables._read_file

    def counting(fs, path, name, columns):
        counted[Path(name).name] += 1
        return real(fs, path, name, columns)

    monkeypatch.setattr(tables, "_read_file", counting)
    monkeypatch.setattr(tables, "_kept", type(tables._kept)())  # a fresh process's memory
    return counted


def test_the_driver_reads_each_source_file_once_per_run(catalogue, reads):
    exp = load_experiment(catalogue)
    preflight.check(exp)  # the command line's check before heavy imports
    infos = preflight.check(exp)  # the trainer's own, before Ray
    inputs = datasets.build_inputs(exp, infos)  # the tables, or their refs when a Ray cluster is up
    assert reads == {"part-0.parquet": 1, "part-1.parquet": 1, "color_val.csv": 1, "size.parquet": 1,
                     "size_val.parquet": 1}
    source = datasets._table(inputs.sources["color.train"])
    assert source.column_names == ["id", "label", "image"]  # column-pruned: "unused" never read
    assert source.column("id").to_pylist() == [f"i{i}" for i in range(9)]
    assert (infos["color"].n_train, infos["color"].n_val, infos["size"].n_train) == (9, 3, 12)


def test_a_changed_file_is_read_again(catalogue, reads, tmp_path):
    exp = load_experiment(catalogue)
    preflight.check(exp)
    frame = pd.read_parquet(tmp_path / "size.parquet")
    pd.concat([frame, frame]).to_parquet(tmp_path / "size.parquet", index=False)
    assert preflight.check(exp)["size"].n_train == 24
    assert reads["size.parquet"] == 2


def test_a_large_source_is_read_by_the_cluster_in_blocks(ray_cluster, catalogue, reads, monkeypatch):
    """Over DRIVER_READ_BYTES the driver streams the label column only; Ray Data reads the input
    columns once, into blocks the decode tasks take their rows from, in file order."""
    monkeypatch.setattr(tables, "DRIVER_READ_BYTES", 0)
    exp = load_experiment(catalogue)
    infos = preflight.check(exp)
    inputs = datasets.build_inputs(exp, infos)
    assert not reads  # no table read whole by the driver
    blocks = inputs.sources["color.train"]
    assert blocks.num_rows == 9
    rows = np.array([8, 0, 5, 4, 3])
    assert blocks.take(rows)["id"].tolist() == [f"i{i}" for i in rows]
    assert sorted(blocks.take(rows).columns) == ["id", "image", "label"]
    local = inputs.in_process().sources["color.train"]
    assert local.take(rows)["id"].tolist() == [f"i{i}" for i in rows]
    # a decode task takes its rows from the blocks: the same batch as from the driver's table
    monkeypatch.setattr(tables, "DRIVER_READ_BYTES", 256 << 20)
    small = datasets.build_inputs(exp, preflight.check(exp))
    prep = inputs.preprocessors["color"]
    decoded = [datasets.decode_rows(datasets._table(i.sources["color.train"]), rows, prep) for i in (inputs, small)]
    decoded.append(ray.get(datasets._decode_step.remote(inputs.sources["color.train"], rows, prep)))
    # image i is a constant (20 i, 0, 0): each row's pixels say which row it is
    np.testing.assert_array_equal(decoded[0].arrays["view_full"][:, 0, 0, 0], 20 * rows)
    assert decoded[0].arrays["view_full"].dtype == np.uint8
    for other in decoded[1:]:
        assert sorted(other.arrays) == sorted(decoded[0].arrays)
        for name, array in decoded[0].arrays.items():
            np.testing.assert_array_equal(other.arrays[name], array)


def test_blocks_keep_the_files_order_when_later_reads_finish_first(ray_cluster, monkeypatch):
    """Row i of the blocks is row i of the source though Ray Data's process-wide default is to hand
    blocks over as they finish: the order is asked of the read itself."""
    def slower_the_earlier(batch: dict) -> dict:  # defined here: Ray's workers cannot import a test module
        time.sleep(0.3 * (4 - int(batch["id"][0]) // 2))  # rows 0-1 finish last, rows 6-7 first
        return batch

    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", False)
    ds = ray.data.range(8, override_num_blocks=4).map_batches(slower_the_earlier, batch_size=None)
    blocks = SourceBlocks.read([ds])
    assert blocks.take(np.arange(8))["id"].tolist() == list(range(8))
    assert ray.data.DataContext.get_current().execution_options.preserve_order is False  # left as it was


@pytest.mark.parametrize("by_cluster", [False, True])
def test_files_that_type_a_column_differently_are_read_as_text(ray_cluster, tmp_path, monkeypatch, by_cluster):
    """Numeric ids and labels in one file, alphanumeric in the next. Inspection reads labels as text;
    the task inputs do too, by the driver or the cluster."""
    for i in range(6):
        Image.new("RGB", (12, 10), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "size").mkdir()
    images = [str(tmp_path / f"{i}.png") for i in range(6)]
    pd.DataFrame({"id": [101, 102, 103], "image": images[:3], "label": [1, 2, 1]}).to_csv(
        tmp_path / "size" / "part-0.csv", index=False)
    pd.DataFrame({"id": ["x4", "x5", "x6"], "image": images[3:], "label": ["S", "M", "S"]}).to_csv(
        tmp_path / "size" / "part-1.csv", index=False)
    exp = load_experiment({"name": "types", "storage_path": str(tmp_path / "runs"), "data": {"image_size": 8},
                           "tasks": [{"name": "size", "train": str(tmp_path / "size"), "image_column": "image",
                                      "id_column": "id"}]})
    monkeypatch.setattr(tables, "DRIVER_READ_BYTES", 0 if by_cluster else 256 << 20)
    infos = preflight.check(exp)
    assert infos["size"].labels == ["1", "2", "M", "S"]
    inputs = datasets.build_inputs(exp, infos)
    source = inputs.sources["size.train"]
    assert isinstance(source, SourceBlocks) == by_cluster
    rows = np.array([5, 0, 3, 2])
    decoded = datasets.decode_rows(source if by_cluster else datasets._table(source), rows, inputs.preprocessors["size"])
    assert decoded.arrays["label"].tolist() == [3, 0, 3, 0]  # S, 1, S, 1
    np.testing.assert_array_equal(decoded.arrays["view_full"][:, 0, 0, 0], 20 * rows)


def test_the_cluster_reads_csv_labels_and_ids_as_the_text_written(ray_cluster, tmp_path, monkeypatch):
    """Arrow types 1.1, 1.10 and 02134 as floats (two classes merged, one renamed) and the ids as ints:
    a large CSV's task inputs and the items a model evaluates hold the text inspection named."""
    from raymtl.config import DataSpec
    from raymtl.predict.plan import Plan
    from raymtl.predict.reading import read_items

    for i in range(3):
        Image.new("RGB", (12, 10), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    frame = pd.DataFrame({"id": ["007", "02134", "3"], "image": [str(tmp_path / f"{i}.png") for i in range(3)],
                          "label": ["1.1", "1.10", "02134"]})
    frame.to_csv(tmp_path / "codes.csv", index=False)
    exp = load_experiment({"name": "codes", "storage_path": str(tmp_path / "runs"), "data": {"image_size": 8},
                           "tasks": [{"name": "zip", "train": str(tmp_path / "codes.csv"), "image_column": "image",
                                      "id_column": "id"}]})
    monkeypatch.setattr(tables, "DRIVER_READ_BYTES", 0)
    infos = preflight.check(exp)
    assert infos["zip"].labels == ["1.1", "1.10", "02134"]
    inputs = datasets.build_inputs(exp, infos)
    blocks = inputs.sources["zip.train"]
    assert isinstance(blocks, SourceBlocks)
    assert blocks.take(np.arange(3))["id"].tolist() == frame["id"].tolist()
    decoded = datasets.decode_rows(blocks, np.array([2, 0, 1]), inputs.preprocessors["zip"])
    assert decoded.arrays["label"].tolist() == [2, 0, 1]
    plan = Plan("m", DataSpec(), inputs=(), heads=(), id_column="id", strict=False, top_k=0, label_column="label")
    items = read_items(str(tmp_path / "codes.csv"), plan).to_pandas()
    assert items.to_dict("list") == frame[["id", "label"]].to_dict("list")


def test_a_large_csv_is_read_for_its_used_columns_only(ray_cluster, tmp_path):
    """An unused column, empty in Ray's first block (typed null) and filled later, failed the read of the
    items to predict and evaluate, and the cluster's task inputs: neither reads nor types it now."""
    from raymtl.config import DataSpec
    from raymtl.predict.plan import Plan
    from raymtl.predict.reading import read_items

    rows = 200_000  # 2.6 MB: several of Arrow's 1 MB CSV blocks
    path = tmp_path / "items.csv"
    path.write_text("id,label,notes\n" + "".join(f"{i:07d},{i % 3},{'x' if i == rows - 1 else ''}\n"
                                                 for i in range(rows)))
    plan = Plan("m", DataSpec(), inputs=(), heads=(), id_column="id", strict=False, top_k=0, label_column="label")
    assert read_items(str(path), plan).count() == rows
    (part,) = datasets.read_source_parts(str(path), ["id", "label"])
    assert part.count() == rows


def test_a_large_source_reads_pq_parts_and_compressed_csv_like_the_driver(ray_cluster, tmp_path, monkeypatch):
    """Every file the driver reads is read by the cluster too: Ray Data's parquet reader skips names
    not ending in .parquet unless told otherwise, which would lose a source's .pq parts."""
    for i in range(8):
        Image.new("RGB", (12, 10), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    frame = pd.DataFrame({"id": [f"i{i}" for i in range(8)], "image": [str(tmp_path / f"{i}.png") for i in range(8)],
                          "label": ["a", "b"] * 4})
    (tmp_path / "size").mkdir()
    frame.iloc[:3].to_parquet(tmp_path / "size" / "part-0.pq", index=False)
    frame.iloc[3:5].to_parquet(tmp_path / "size" / "part-1.pq", index=False)
    frame.iloc[5:].to_csv(tmp_path / "size" / "part-2.csv.bz2", index=False)
    exp = load_experiment({"name": "names", "storage_path": str(tmp_path / "runs"), "data": {"image_size": 8},
                           "tasks": [{"name": "size", "train": str(tmp_path / "size"), "image_column": "image",
                                      "id_column": "id"}]})
    monkeypatch.setattr(tables, "DRIVER_READ_BYTES", 0)
    inputs = datasets.build_inputs(exp, preflight.check(exp))
    blocks = inputs.sources["size.train"]
    assert isinstance(blocks, SourceBlocks)
    assert blocks.take(np.arange(8))["id"].tolist() == frame["id"].tolist()
