"""Source tables: reading every source kind, and one clear error per data fault."""

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymtl.config import ConfigError, DataSpec, Experiment, TaskSpec, ViewSpec
from raymtl.data.task_info import TaskInfo
from raymtl.data.inspection import inspect_tasks
from raymtl.data import tables
from raymtl.data.tables import read_table, source_files

COLORS = ["red", "blue", "red", "green"]


def frame(labels: list[Any] = COLORS, **extra: list[Any]) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({"id": [f"i{k}" for k in range(n)], "image": [f"/img/{k}.png" for k in range(n)],
                         "title": ["a title"] * n, "label": labels, **extra})


def write(df: pd.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return str(path)


def experiment(data: DataSpec | None = None, **task: Any) -> Experiment:
    spec = {"name": "color", "image_column": "image", **task}
    return Experiment(name="t", tasks=[TaskSpec(**spec)], data=data or DataSpec()).validate()


def inspect_one(data: DataSpec | None = None, **task: Any) -> TaskInfo:
    return inspect_tasks(experiment(data, **task))["color"]


def raises(*fragments: str) -> Any:
    """pytest.raises(ConfigError) whose message must contain every fragment, literally."""
    return pytest.raises(ConfigError, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# ---------------------------------------------------------------- sources


def test_parquet_source_describes_task(tmp_path: Path) -> None:
    info = inspect_one(train=write(frame(), tmp_path / "t.parquet"), validation=write(frame(["red"]), tmp_path / "v.parquet"),
                       weight=2.0)
    assert info == TaskInfo("color", "multiclass", ["blue", "green", "red"], 4, 1, True, False, 2.0)
    assert info.num_labels == 3


def test_dataframe_source_and_no_validation() -> None:
    info = inspect_one(train=frame(), image_column=None, text_column="title", data=DataSpec(tokenizer="/tok"))
    assert (info.n_train, info.n_val, info.has_image, info.has_text) == (4, 0, False, True)


def test_view_with_own_column_counts_as_image_input() -> None:
    data = DataSpec(views=[ViewSpec("full", column="image")], tokenizer="/tok")
    assert inspect_one(train=frame(), image_column=None, text_column="title", data=data).has_image


def test_csv_source(tmp_path: Path) -> None:
    info = inspect_one(train=write(frame([3, 10, 2, 3]), tmp_path / "t.csv"))
    assert info.labels == ["2", "3", "10"]  # numeric labels in numeric order, as strings


# Arrow would type these as floats, merging two classes ('1.1') and renaming one ('2134.0'); the ids as ints.
CODES = "image,label,id\n/img/0.png,1.1,007\n/img/1.png,1.10,02134\n/img/2.png,02134,3\n"


@pytest.mark.parametrize("large", [False, True])
def test_csv_labels_are_the_text_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, large: bool) -> None:
    monkeypatch.setattr(tables, "DRIVER_READ_BYTES", 0 if large else 256 << 20)  # large: the label column streamed
    (path := tmp_path / "t.csv").write_text(CODES)
    assert inspect_one(train=str(path)).labels == ["1.1", "1.10", "02134"]
    assert inspect_one(train=str(path), labels=["02134", "1.10", "1.1"]).labels == ["02134", "1.10", "1.1"]


def test_csv_labels_and_ids_decode_as_inspected(tmp_path: Path) -> None:
    """The task inputs (read by the driver: a small source) encode the labels inspection named, and
    keep the ids' leading zeros."""
    from PIL import Image

    from raymtl.data import datasets

    for i in range(3):
        Image.new("RGB", (6, 6), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (path := tmp_path / "t.csv").write_text(CODES.replace("/img/", f"{tmp_path}/"))
    exp = experiment(train=str(path), id_column="id", data=DataSpec(image_size=8))
    infos = inspect_tasks(exp)
    inputs = datasets.build_inputs(exp, infos)
    table = datasets._table(inputs.sources["color.train"])
    assert table.column("id").to_pylist() == ["007", "02134", "3"]
    decoded = datasets.decode_rows(table, [2, 0, 1], inputs.preprocessors["color"])
    assert decoded.arrays["label"].tolist() == [2, 0, 1]  # 02134, 1.1, 1.10: three classes


def test_csv_items_to_predict_keep_their_text(tmp_path: Path) -> None:
    from raymtl.predict.plan import Plan
    from raymtl.predict.reading import items_here

    (path := tmp_path / "t.csv").write_text(CODES)
    plan = Plan("m", DataSpec(), inputs=(), heads=(), id_column="id", strict=False, top_k=0, label_column="label")
    items = items_here(str(path), plan, None)
    assert items.to_dict("list") == {"id": ["007", "02134", "3"], "label": ["1.1", "1.10", "02134"]}


@pytest.mark.parametrize("cell", ["", "NA", "null"])
def test_an_empty_or_na_csv_label_is_missing(tmp_path: Path, cell: str) -> None:
    """As pandas reads them (R's write.csv writes NA): not a class named 'NA'."""
    (path := tmp_path / "t.csv").write_text(f"image,label\np0,red\np1,{cell}\n")
    with raises("label_column 'label' is empty in 1 row(s)", "(first: row 1) (in a CSV, a cell reading NA"):
        inspect_one(train=str(path))


def test_glob_source_spans_files_and_skips_hidden(tmp_path: Path) -> None:
    write(frame(["red", "red"]), tmp_path / "part-1.parquet")
    write(frame(["blue"]), tmp_path / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    pattern = str(tmp_path / "part-*.parquet")
    assert source_files(pattern) == [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    assert source_files(str(tmp_path / "*")) == source_files(pattern)
    info = inspect_one(train=pattern)
    assert (info.n_train, info.labels) == (3, ["blue", "red"])
    assert read_table(pattern, ["label"])["label"].tolist() == ["blue", "red", "red"]


def test_nested_glob(tmp_path: Path) -> None:
    write(frame(), tmp_path / "a" / "x.parquet")
    write(frame(), tmp_path / "b" / "x.parquet")
    write(frame(), tmp_path / "b" / "x.csv")
    assert source_files(str(tmp_path / "*" / "x.parquet")) == [str(tmp_path / d / "x.parquet") for d in "ab"]


def test_uri_source(tmp_path: Path) -> None:
    write(frame(), tmp_path / "d" / "t.parquet")
    uri = f"file://{tmp_path}/d/*.parquet"
    assert source_files(uri) == [f"file://{tmp_path}/d/t.parquet"]
    assert inspect_one(train=uri).n_train == 4
    assert len(read_table(f"file://{tmp_path}/d/t.parquet")) == 4


def test_read_table_reads_only_requested_columns(tmp_path: Path) -> None:
    path = write(frame(), tmp_path / "t.parquet")
    assert list(read_table(path, ["title", "label"]).columns) == ["title", "label"]
    assert list(read_table(frame(), ["id"]).columns) == ["id"]
    assert len(read_table(path).columns) == 4


def test_inspect_reads_a_small_table_once_with_every_column_the_run_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read_columns = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **kw: read_columns.append(kw["columns"]) or real(*a, **kw))
    inspect_one(train=write(frame(), tmp_path / "t.parquet"), text_column="title", id_column="id",
                data=DataSpec(tokenizer="/tok"))
    assert read_columns == [["label", "image", "title", "id"]]


def test_inspect_streams_only_the_label_column_of_a_large_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "DRIVER_READ_BYTES", 0)
    monkeypatch.setattr(pq, "read_table", None)  # a large table is never read whole
    path = tmp_path / "t.parquet"
    frame(["red"] * 5 + [None] + ["blue"] * 4).to_parquet(path, index=False, row_group_size=4)
    with raises("label_column 'label' is empty in 1 row(s)", "(first: row 5)"):
        inspect_one(train=str(path))
    frame(["red"] * 5 + ["blue"] * 4).to_parquet(path, index=False, row_group_size=4)
    info = inspect_one(train=str(path))
    assert (info.n_train, info.labels) == (9, ["blue", "red"])


def test_an_image_sample_reads_past_empty_files(tmp_path: Path) -> None:
    """A large source is sampled from its first rows: Spark's output may start with empty parts."""
    for i in range(8):
        write(frame([]), tmp_path / f"part-{i}.{'csv' if i % 2 else 'parquet'}")
    with raises(f"'{tmp_path}' has no rows"):
        tables.head_rows(str(tmp_path), ["image"], 8)
    write(frame(), tmp_path / "part-8.parquet")
    write(frame(["red"] * 9), tmp_path / "part-9.csv")
    sample = tables.head_rows(str(tmp_path), ["image"], 6)["image"].tolist()
    assert sample == [f"/img/{k}.png" for k in [0, 1, 2, 3, 0, 1]]


# ---------------------------------------------------------------- labels


def test_explicit_labels_keep_their_order_as_strings(tmp_path: Path) -> None:
    info = inspect_one(train=frame([1, 2, 1]), labels=[2, 1, 3])
    assert info.labels == ["2", "1", "3"]


def test_multilabel_lists_from_parquet(tmp_path: Path) -> None:
    tags = [["casual"], ["sport", "casual"], [], ["formal"]]
    path = write(frame(tags), tmp_path / "t.parquet")
    info = inspect_one(train=path, validation=frame([["sport"]]), test=frame([["formal"], ["sport"]]), kind="multilabel")
    assert (info.labels, info.n_train, info.n_val, info.n_test) == (["casual", "formal", "sport"], 4, 1, 2)
    assert list(read_table(path)["label"].iloc[1]) == ["sport", "casual"]


# ---------------------------------------------------------------- faults


def test_missing_file(tmp_path: Path) -> None:
    with raises("task 'color' (train)", f"file '{tmp_path}/nope.parquet' does not exist"):
        inspect_one(train=str(tmp_path / "nope.parquet"))


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with raises("task 'color' (validation)", f"'{tmp_path}/*.parquet' matches no files"):
        inspect_one(train=frame(), validation=str(tmp_path / "*.parquet"))


def test_glob_under_missing_directory(tmp_path: Path) -> None:
    with raises("matches no files"):
        source_files(str(tmp_path / "missing" / "*.parquet"))


def test_directory_source_reads_its_data_files(tmp_path: Path) -> None:
    write(frame(), tmp_path / "year=2024" / "part-0.parquet")
    write(frame(["red"]), tmp_path / "part-1.parquet")
    write(frame(), tmp_path / "_temporary" / "part-9.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("")
    assert source_files(tmp_path) == [str(tmp_path / "part-1.parquet"), str(tmp_path / "year=2024" / "part-0.parquet")]
    assert inspect_one(train=str(tmp_path)).n_train == 5


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("")
    with raises("task 'color' (train)", f"'{tmp_path}' is a directory without .parquet or .csv files"):
        inspect_one(train=str(tmp_path))


def test_unreadable_parquet(tmp_path: Path) -> None:
    bad = tmp_path / "t.parquet"
    bad.write_bytes(b"not a parquet file")
    with raises("task 'color' (train)", f"cannot read '{bad}'"):
        inspect_one(train=str(bad))


@pytest.mark.parametrize("name", ["t.json", "t.csv.xz", "t.csv.zip"])
def test_unsupported_file_type(tmp_path: Path, name: str) -> None:
    """A CSV compressed in a way Arrow cannot open by the name (xz, zip) is refused by its name, not
    read as text and failed on its bytes."""
    (tmp_path / name).write_bytes(b"\xfd7zXZ\x00\x00")
    with raises("unsupported file type", name):
        inspect_one(train=str(tmp_path / name))


def test_compressed_csv_reads_like_plain(tmp_path: Path) -> None:
    frame = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "label": ["red", "blue"]})
    for suffix in (".gz", ".bz2"):
        path = tmp_path / f"t.csv{suffix}"
        frame.to_csv(path, index=False)  # pandas compresses by the name
        assert inspect_one(train=str(path)).labels == ["blue", "red"]


def test_source_of_wrong_type() -> None:
    with raises("task 'color' (train)", "or a DataFrame), got int"):
        inspect_one(train=5)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_missing_column_names_file_and_available_columns(tmp_path: Path, suffix: str) -> None:
    path = write(frame(), tmp_path / f"t{suffix}")
    with raises("task 'color' (train)", "text_column 'titel'", f"not found in {path}", "did you mean 'title'?",
                "available columns: id, image, title, label"):
        inspect_one(train=path, text_column="titel", data=DataSpec(tokenizer="/tok"))


def test_missing_label_column_in_dataframe() -> None:
    with raises("task 'color' (train)", "label_column 'color' not found in the DataFrame"):
        inspect_one(train=frame(), label_column="color")


def test_missing_view_column(tmp_path: Path) -> None:
    data = DataSpec(views=[ViewSpec("full"), ViewSpec("back", column="back_image")])
    path = write(frame(), tmp_path / "v.parquet")
    with raises("task 'color' (validation)", "data.views[1].column 'back_image'", f"not found in {path}"):
        inspect_one(train=frame(back_image=["x"] * 4), validation=path, data=data)


def test_text_column_needs_tokenizer() -> None:
    with raises("task 'color'", "text_column 'title'", "data.tokenizer is not"):
        inspect_one(train=frame(), text_column="title")


def test_empty_train(tmp_path: Path) -> None:
    path = write(frame([]), tmp_path / "t.parquet")
    with raises("task 'color' (train)", f"'{path}' has no rows"):
        inspect_one(train=path)


def test_empty_validation() -> None:
    with raises("task 'color' (validation)", "the DataFrame has no rows"):
        inspect_one(train=frame(), validation=frame([]))


def test_validation_label_missing_from_train(tmp_path: Path) -> None:
    path = write(frame(["red", "purple"]), tmp_path / "v.parquet")
    with raises("task 'color' (validation)", f"label 'purple' in {path}", "does not occur in the train data"):
        inspect_one(train=frame(), validation=path)


def test_train_label_outside_explicit_labels(tmp_path: Path) -> None:
    path = write(frame(), tmp_path / "t.csv")
    with raises("task 'color' (train)", f"label 'green' in {path}", "is not in the task's `labels` ['red', 'blue']"):
        inspect_one(train=path, labels=["red", "blue"])


def test_validation_label_outside_explicit_labels() -> None:
    with raises("task 'color' (validation)", "label 'pink' in the DataFrame is not in the task's `labels`"):
        inspect_one(train=frame(), validation=frame(["pink"]), labels=["red", "blue", "green"])


def test_explicit_labels_may_lack_train_rows() -> None:
    info = inspect_one(train=frame(), validation=frame(["pink"]), labels=["red", "blue", "green", "pink"])
    assert info.labels == ["red", "blue", "green", "pink"]


def test_null_label() -> None:
    with raises("task 'color' (train)", "label_column 'label' is empty in 1 row(s) of the DataFrame (first: row 2)"):
        inspect_one(train=frame(["red", "blue", None, "red"]))


def test_multilabel_cell_not_a_list(tmp_path: Path) -> None:
    path = write(frame(["casual", "sport", "casual", "formal"]), tmp_path / "t.csv")
    with raises("task 'color' (train)", "multilabel label_column 'label' needs a list", f"row 0 of {path} holds 'casual' (str)"):
        inspect_one(train=path, kind="multilabel")


def test_list_cells_in_multiclass_task() -> None:
    with raises("task 'color' (train)", "holds a list in row 1 of the DataFrame (['red', 'blue'])", "kind: multilabel"):
        inspect_one(train=frame(["red", ["red", "blue"]]))


def test_multilabel_label_outside_explicit_labels() -> None:
    with raises("task 'color' (train)", "label 'party' in the DataFrame is not in"):
        inspect_one(train=frame([["casual"], ["party", "casual"]]), kind="multilabel", labels=["casual", "sport"])


def test_multilabel_task_without_any_label(tmp_path: Path) -> None:
    """No label gives a head of no outputs, whose NaN loss made val/mean_loss NaN."""
    path = write(frame([[], []]), tmp_path / "t.parquet")
    with raises("task 'color' (train)", f"'{path}' has no label", "every row's label list is empty"):
        inspect_one(train=path, kind="multilabel")


def test_multiclass_task_with_one_label() -> None:
    """A classifier over one class learns nothing."""
    with raises("task 'color' (train)", "the DataFrame has one label, 'red'", "at least two"):
        inspect_one(train=frame(["red", "red"]))
    with raises("task 'color'", "`labels` ['red'] has one label"):
        inspect_one(train=frame(["red", "red"]), labels=["red"])
    assert inspect_one(train=frame(["red", "red"]), labels=["red", "blue"]).labels == ["red", "blue"]
    assert inspect_one(train=frame([["red"], ["red"]]), kind="multilabel").labels == ["red"]


def test_a_uri_resolves_like_pyarrow_with_one_filesystem_per_bucket(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from raymtl import storage

    (tmp_path / "a b").mkdir()
    for uri in [f"file://{tmp_path}/a%20b/c.parquet", f"file://{tmp_path}/a%20b/", "file:///"]:
        fs, path = storage.resolve(uri)
        assert path == pafs.FileSystem.from_uri(uri)[1]
    assert storage.resolve(f"file://{tmp_path}/x")[0] is storage.resolve(f"file://{tmp_path}/y")[0]


def test_a_source_check_names_the_first_file_in_order_that_lacks_a_column(tmp_path: Path) -> None:
    """The footers are read concurrently; the fault reported is still the first file's."""
    from raymtl.data.tables import check_source

    for i in range(40):
        columns = {"image": ["a.png"], "label": ["red"]} if i not in (17, 31) else {"image": ["a.png"]}
        pq.write_table(pa.table(columns), tmp_path / f"part-{i:03d}.parquet")
    with raises("label 'label' not found in", "part-017.parquet"):
        check_source(str(tmp_path), {"image": "image", "label": "label"})
