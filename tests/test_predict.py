"""Batch prediction on the session's Ray cluster, against the same saved model run in process.

The model is tiny and untrained (built, not fitted): `color` (image + title, multiclass), `pattern`
(image, multiclass) and `style` (title, multilabel; image when the MiniLM tokenizer is missing).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import raymtl
from ops import Ops
from raymtl.cli import build_parser, main
from raymtl.config import ConfigError, DataSpec, Experiment, ModelSpec, TaskSpec, ViewSpec
from raymtl.data import device_inputs
from raymtl.data.synthetic import COLORS, PATTERNS, STYLE_WORDS, default_tokenizer_path, make_catalogue
from raymtl.data.task_info import TaskInfo
from raymtl.data.device_inputs import DeviceInputs
from raymtl.data.transforms import Preprocessor
from raymtl.models import artifact
from raymtl.models.artifact import save_model
from raymtl.models.multitask import MultiTaskModel
from raymtl.predict import DECODERS_PER_GPU_NODE, predict
from raymtl.predict.actors import BadRowError, Predict, Prepare
from raymtl.predict.output import output_columns
from raymtl.predict.plan import Head, make_plan
from raymtl.predict.reading import items_here, read_items

TOKENIZER = default_tokenizer_path()
MISSING_IMAGE, EMPTY_TITLE = "color-missing-image", "color-empty-title"
STYLES = sorted({tag for tags in STYLE_WORDS.values() for tag in tags})


def tiny_bert(tokenizer: str) -> dict:
    from transformers import AutoTokenizer

    return {"model_type": "bert", "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer)), "hidden_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 16}


def task(name: str, kind: str = "multiclass", image: bool = True, text: bool = False) -> TaskSpec:
    return TaskSpec(name, train="unused.parquet", kind=kind, image_column="image" if image else None,
                    text_column="title" if text else None, id_column="id", threshold=0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    text = TOKENIZER is not None
    tasks = [task("color", text=text), task("pattern"), task("style", "multilabel", image=not text, text=text)]
    labels = {"color": list(COLORS), "pattern": list(PATTERNS), "style": STYLES}
    exp = Experiment(
        "tiny", tasks,
        data=DataSpec(image_size=32, views=[ViewSpec("full"), ViewSpec("crop", crop=0.6)], tokenizer=TOKENIZER,
                      max_length=16),
        model=ModelSpec(image_backbone="resnet18", text_config=tiny_bert(TOKENIZER) if text else None, hidden_dim=16,
                        groups={"look": ["color", "pattern"], "words": ["style"]}),
    )
    infos = {t.name: TaskInfo(t.name, t.kind, labels[t.name], 10, 0, t.image_column is not None,
                              t.text_column is not None, threshold=t.threshold) for t in tasks}
    torch.manual_seed(0)
    model = MultiTaskModel(exp.model, infos, ["full", "crop"], exp.task_groups())
    folder = tmp_path_factory.mktemp("model")
    save_model(folder, model, data=exp.data, experiment=exp.to_dict())
    return str(folder)


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> pd.DataFrame:
    """12 synthetic items plus one whose image file is missing and one with an empty title."""
    root = tmp_path_factory.mktemp("items")
    frame = pd.read_parquet(make_catalogue(root, image_size=32, sizes={"color": 15})["color"]["train"])
    frame = frame.drop(columns="label").head(12)
    bad = pd.DataFrame({"id": [MISSING_IMAGE, EMPTY_TITLE], "image": [str(root / "gone.png"), frame.image[0]],
                        "title": ["alvo relaxed red cotton shirt", " "]})
    return pd.concat([frame, bad], ignore_index=True)


@pytest.fixture(scope="module")
def items_file(items, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("input") / "items.parquet"
    items.to_parquet(path)
    return str(path)


@pytest.fixture(scope="module")
def predicted(ray_cluster, model_dir, items_file, tmp_path_factory):
    """(summary, predictions by id) of one run over every task, with top-2 lists."""
    out = str(tmp_path_factory.mktemp("predictions") / "all")
    summary = predict(model_dir, items_file, out, top_k=2, batch_size=4, local=False)
    return summary, read(out)


def read(path: str) -> pd.DataFrame:
    return pd.read_parquet(path).set_index("id").sort_index()


def in_process(model_dir: str, items: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per task, the probabilities of the loaded model on `items`, preprocessed as in training."""
    saved = raymtl.load(model_dir)
    probs = {}
    for name, info in saved.infos.items():
        spec = TaskSpec(name, train=None, image_column="image" if info.has_image else None,
                        text_column="title" if info.has_text else None)
        arrays = Preprocessor(spec, info, saved.data, with_labels=False)(items)
        batch = DeviceInputs(saved.data, "cpu")(arrays)
        with torch.no_grad():
            logits = saved.model(batch, name)
        probs[name] = (logits.softmax(1) if info.kind == "multiclass" else logits.sigmoid()).numpy()
    return probs


def test_predictions_are_the_in_process_models_label_names_and_probabilities(predicted, model_dir, items):
    _, out = predicted
    good = items[~items.id.isin([MISSING_IMAGE, EMPTY_TITLE])].sort_values("id").reset_index(drop=True)
    expected = in_process(model_dir, good)
    rows = out.loc[good.id]
    for name, labels in (("color", list(COLORS)), ("pattern", list(PATTERNS))):
        best = expected[name].argmax(1)
        assert list(rows[name]) == [labels[b] for b in best]
        np.testing.assert_allclose(rows[f"{name}_prob"], expected[name][np.arange(len(best)), best], atol=1e-5)
        top = rows[f"{name}_top_k"].iloc[0]
        assert [t["label"] for t in top] == [labels[j] for j in np.argsort(-expected[name][0])[:2]]
    chosen = expected["style"] > 0.5
    assert 0 < chosen.sum() < chosen.size  # the threshold picks some labels, not all
    assert [list(x) for x in rows["style"]] == [[STYLES[j] for j in np.flatnonzero(c)] for c in chosen]
    for got, probs, c in zip(rows["style_prob"], expected["style"], chosen):
        np.testing.assert_allclose(got, probs[c], atol=1e-5)


def test_bad_rows_come_out_with_their_error_and_null_predictions(predicted, items):
    summary, out = predicted
    assert summary.rows_in == summary.rows_out == len(out) == len(items)
    assert sorted(out.index) == sorted(items.id)
    missing = out.loc[MISSING_IMAGE]
    assert "cannot read image" in missing.error and "gone.png" in missing.error
    assert missing[["color", "color_prob", "pattern", "pattern_prob"]].isna().all()
    assert out.error.drop([MISSING_IMAGE, EMPTY_TITLE]).isna().all()
    if TOKENIZER is None:
        assert summary.bad_rows == 1
        pytest.skip("no MiniLM tokenizer installed: the empty-text half needs a text task (image half passed)")
    assert missing["style"] is not None  # style reads only the title, which is fine
    empty = out.loc[EMPTY_TITLE]
    assert "empty text in column 'title'" in empty.error
    assert empty[["color", "style", "style_prob", "style_top_k"]].isna().all() and empty["pattern"] is not None
    assert summary.bad_rows == 2 and summary.bad_by_reason == {"unreadable image": 1, "empty text": 1}


def test_strict_run_fails_naming_the_bad_row(ray_cluster, model_dir, items, tmp_path):
    for local in (True, False):
        with pytest.raises(BadRowError, match=MISSING_IMAGE):
            predict(model_dir, items, str(tmp_path / "out"), tasks=["pattern"], strict=True, local=local)
        assert not (tmp_path / "out").exists()


def no_ray(address=None):
    """`ensure_ray`'s stand-in where nothing may ask for a cluster."""
    raise RuntimeError("Ray was asked for")


def counted_loads(monkeypatch) -> list:
    """The calls of `raymtl.models.artifact.load` from now on (each still loads)."""
    loads, load = [], artifact.load
    monkeypatch.setattr(artifact, "load", lambda *args, **kw: loads.append(args) or load(*args, **kw))
    return loads


def test_prediction_in_this_process_needs_no_ray(model_dir, items, tmp_path, monkeypatch, capsys):
    """A DataFrame of few items is predicted here (and said so), the model loaded once, without
    asking for Ray; a null id stays null; a strict run that fails with `overwrite` leaves no output,
    not the old one either; an empty input, and `local` with an option only actors take, are
    ConfigErrors."""
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    frame = items.copy()
    frame.loc[0, "id"] = None
    out = tmp_path / "out"
    loads = counted_loads(monkeypatch)
    summary = predict(model_dir, frame, str(out), tasks=["pattern"], batch_size=4)
    assert len(loads) == 1 and "predicted in this process" in capsys.readouterr().out
    got = pd.read_parquet(out)
    assert summary.rows_out == len(got) == len(frame) and got.id.isna().sum() == 1 and summary.bad_rows == 1
    with pytest.raises(BadRowError, match=MISSING_IMAGE):
        predict(model_dir, frame, str(out), tasks=["pattern"], strict=True, overwrite=True)
    assert not out.exists()
    with pytest.raises(ConfigError, match="has no rows"):
        predict(model_dir, frame.head(0), str(out))
    with pytest.raises(ConfigError, match="takes no num_gpus, address"):
        predict(model_dir, frame, str(out), local=True, num_gpus=0, address="ray://head:10001")
    monkeypatch.setattr("raymtl.predict.actors_have_gpus", lambda: True)
    with pytest.raises(RuntimeError, match="Ray was asked for"):
        predict(model_dir, frame, str(out))
    parse = build_parser().parse_args
    assert [parse(["predict", "m", "i", "o", *more]).local for more in ([], ["--local"], ["--no-local"])] == [
        None, True, False]


def test_actors_have_gpus_only_on_a_cluster_with_gpus_this_process_lacks(monkeypatch):
    import ray

    from raymtl import predict as prediction

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    assert not prediction.actors_have_gpus()  # a local cluster would have this machine's: none
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert prediction.actors_have_gpus()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not prediction.actors_have_gpus()  # this process has one too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(RuntimeError, match="Ray was asked for"):  # a submitted job joins its cluster to look
        prediction.actors_have_gpus()


def test_a_small_input_is_predicted_in_this_process_as_on_ray(predicted, model_dir, items_file, tmp_path, monkeypatch):
    """At most LOCAL_ROWS items: the same rows as Ray Data's actors write, no Ray cluster asked for;
    `overwrite` replaces the old output; more items, `local=False`, or an option only actors take
    (GPUs, a cluster address) go to Ray."""
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    out = tmp_path / "here"
    for overwrite in (False, True):
        summary = predict(model_dir, items_file, str(out), top_k=2, batch_size=4, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    ray_summary, on_ray = predicted
    assert (summary.rows_out, summary.bad_rows, summary.bad_by_reason) == (
        ray_summary.rows_out, ray_summary.bad_rows, ray_summary.bad_by_reason)
    here = read(str(out))
    assert list(here.columns) == list(on_ray.columns)
    plain = [c for c in here.columns if not c.endswith(("_top_k", "style", "style_prob"))]
    pd.testing.assert_frame_equal(here[plain], on_ray[plain], atol=1e-6)
    for column in [c for c in here.columns if c not in plain]:
        for ours, theirs in zip(here[column], on_ray[column]):
            assert same_list(ours, theirs), (column, ours, theirs)
    for options in ({"local": False}, {"num_gpus": 0.0}, {"address": "ray://head:10001"}):
        with pytest.raises(RuntimeError, match="Ray was asked for"):
            predict(model_dir, items_file, str(tmp_path / "ray"), **options)
    monkeypatch.setattr("raymtl.predict.LOCAL_ROWS", summary.rows_in - 1)
    with pytest.raises(RuntimeError, match="Ray was asked for"):
        predict(model_dir, items_file, str(tmp_path / "ray"))


def same_list(ours, theirs) -> bool:
    """Two list cells alike: labels equal, scores within float error (both null: alike)."""
    if ours is None or theirs is None:
        return ours is None and theirs is None
    ours, theirs = list(ours), list(theirs)
    if ours and isinstance(ours[0], dict):
        return [t["label"] for t in ours] == [t["label"] for t in theirs] and np.allclose(
            [t["score"] for t in ours], [t["score"] for t in theirs], atol=1e-6)
    return ours == theirs if ours and isinstance(ours[0], str) else np.allclose(ours, theirs, atol=1e-6)


def test_cli_writes_the_same_predictions_for_a_task_subset(predicted, model_dir, items_file, tmp_path):
    out = tmp_path / "subset"
    assert main(["predict", model_dir, items_file, str(out), "--tasks", "pattern", "--top-k", "2",
                 "--batch-size", "4"]) == 0
    subset, full = read(str(out)), predicted[1]
    assert list(subset.columns) == ["pattern", "pattern_prob", "pattern_top_k", "error"]
    pd.testing.assert_frame_equal(subset[["pattern", "pattern_prob"]], full[["pattern", "pattern_prob"]])
    for ours, theirs in zip(subset.pattern_top_k.dropna(), full.pattern_top_k.dropna()):
        assert [t["label"] for t in ours] == [t["label"] for t in theirs]
        np.testing.assert_allclose([t["score"] for t in ours], [t["score"] for t in theirs], atol=1e-6)
    assert subset.error.notna().sum() == 1 and "'pattern'" in subset.error[MISSING_IMAGE]


def test_a_folder_of_images_is_one_row_per_image_with_its_path_as_id(ray_cluster, model_dir, items, tmp_path):
    for path in items.image[:3]:
        shutil.copy(path, tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    plan = make_plan(model_dir, raymtl.load(model_dir), tasks=["pattern"])
    rows = read_items(str(tmp_path), plan).take_all()
    assert sorted(r["id"] for r in rows) == sorted(str(tmp_path / Path(p).name) for p in items.image[:3])
    assert all(r["image"] == r["id"] for r in rows)
    assert items_here(str(tmp_path), plan, None).to_dict("records") == sorted(rows, key=lambda r: r["id"])
    assert items_here(str(tmp_path), plan, 2) is None  # more images than asked for


def test_image_uris_of_a_folder_with_a_query_keep_it_after_the_file_name(tmp_path, monkeypatch):
    """A query configures the folder's filesystem (`?endpoint_override=...`): each image's URI is the
    folder's path, the file's relative path, then the query, as `storage.resolve` reads it."""
    import pyarrow.fs as pafs

    from raymtl.predict import reading

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "sub" / "b.png").write_bytes(b"")
    monkeypatch.setattr(reading.storage, "resolve", lambda path: (pafs.LocalFileSystem(), str(tmp_path)))
    monkeypatch.setattr(reading.storage, "is_uri", lambda path: True)
    assert reading.image_files("s3://b/imgs/?endpoint_override=x") == [
        "s3://b/imgs/a.jpg?endpoint_override=x", "s3://b/imgs/sub/b.png?endpoint_override=x"]
    assert reading.image_files("s3://b/imgs") == ["s3://b/imgs/a.jpg", "s3://b/imgs/sub/b.png"]


def test_a_uri_with_a_query_keeps_it_at_the_end_of_every_path_joined_to_it():
    """A model or run folder at `s3://b/m?endpoint_override=x`: its files are `s3://b/m/<file>?endpoint_override=x`
    (joined after the query, the file's name was read as part of the query)."""
    from raymtl import storage

    joined = storage.join("s3://b/m?endpoint_override=x", "raymtl_model.json")
    assert joined == "s3://b/m/raymtl_model.json?endpoint_override=x"
    assert storage.join("s3://b/runs", "r", "checkpoint_1") == "s3://b/runs/r/checkpoint_1"


def test_items_read_here_are_counted_only_from_a_small_source(model_dir, items, items_file, monkeypatch):
    from raymtl.predict import reading

    plan = make_plan(model_dir, raymtl.load(model_dir))
    assert items_here(items_file, plan, len(items)).equals(items[list(plan.required_columns)])
    assert items_here(items_file, plan, len(items) - 1) is None
    monkeypatch.setattr(reading, "SMALL_BYTES", 0)  # too large to read for a count: Ray's
    assert items_here(items_file, plan, 10**6) is None
    assert len(items_here(items_file, plan, None)) == len(items)  # `local=True`: read whatever its size
    with pytest.raises(ConfigError, match="image_column 'image'"):
        items_here(items.drop(columns="image"), plan, None)


def test_output_columns_choose_labels_by_threshold_and_null_bad_rows():
    probs = np.array([[0.9, 0.5, 0.6], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], np.float32)
    bad = np.array([False, False, True])
    tags = output_columns(Head("tags", "multilabel", ("a", "b", "c"), 0.5, (0,)), probs, bad, top_k=2)
    assert tags["tags"].to_pylist() == [["a", "c"], [], None]  # 0.5 is not above the threshold
    assert tags["tags_prob"].to_pylist() == [pytest.approx([0.9, 0.6]), [], None]
    assert [[t["label"] for t in row] if row else row for row in tags["tags_top_k"].to_pylist()] == [
        ["a", "c"], ["c", "b"], None]
    kind = output_columns(Head("kind", "multiclass", ("a", "b", "c"), 0.5, (0,)), probs, bad, top_k=0)
    assert set(kind) == {"kind", "kind_prob"}
    assert kind["kind"].to_pylist() == ["a", "c", None]
    assert kind["kind_prob"].to_pylist() == [pytest.approx(0.9), pytest.approx(0.3), None]


def test_driver_side_faults_are_named_before_ray_runs(model_dir, items_file, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'pattern'"):
        predict(model_dir, items_file, str(tmp_path / "out"), tasks=["patern"])
    with pytest.raises(ConfigError, match="already exists"):
        predict(model_dir, items_file, str(tmp_path))


def test_a_batch_goes_to_the_device_once_and_its_probabilities_come_back_in_one_copy(model_dir, items, monkeypatch):
    plan = make_plan(model_dir, raymtl.load(model_dir))
    batch = Prepare(plan)(items)
    predictor = Predict(plan, use_gpu=False)
    inputs = sorted(k for k in batch if k.split("/", 1)[0].isdigit() and not k.endswith("/error"))
    assert sum(0 in h.inputs for h in plan.heads) >= 2  # color and pattern read the same image input
    converted, copied_back = [], []
    host_tensor, cpu = device_inputs.host_tensor, torch.Tensor.cpu

    def counting_host_tensor(value, *args, **kwargs):  # every array bound for the device passes here
        converted.append(next((key for key, array in batch.items() if value is array), "a copy"))
        return host_tensor(value, *args, **kwargs)

    def counting_cpu(self, *args, **kwargs):
        copied_back.append(self.shape)
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(device_inputs, "host_tensor", counting_host_tensor)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    with Ops() as ops:
        results = predictor.probabilities(batch)
    assert ops.host_reads == 0  # no value read back into Python: on a GPU each would wait for the device
    assert sorted(converted) == inputs  # each input once per batch, whatever reads it
    assert copied_back == [(len(items), sum(len(h.labels) for h in plan.heads))]
    monkeypatch.undo()

    good = ~np.isin(batch["id"], [MISSING_IMAGE, EMPTY_TITLE])
    expected = in_process(model_dir, items[good].reset_index(drop=True))
    for head, (probs, bad) in zip(plan.heads, results):
        np.testing.assert_allclose(probs[~bad & good], expected[head.task], atol=1e-5)
        assert not probs[bad].any()
        assert np.array_equal(bad, np.any([batch[f"{i}/error"] != "" for i in head.inputs], axis=0))
    assert any(bad.any() for _, bad in results)  # the batch has bad rows to zero


def test_model_actors_on_cpu_by_default_only_without_gpus_and_said_so(monkeypatch):
    import ray

    from raymtl import predict as predict_mod

    said = []
    monkeypatch.setattr(predict_mod.console, "say", said.append)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert predict_mod.gpus_per_actor(None) == 1.0 and said == []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert predict_mod.gpus_per_actor(None) == 0.0
    assert "no GPU now" in said[0] and "--num-gpus 1" in said[0]
    assert predict_mod.gpus_per_actor(1.0) == 1.0  # asked for: GPU actors, which an autoscaler starts nodes for
    assert len(said) == 1


def test_the_decoding_pool_starts_on_the_free_cpus_and_grows_with_the_model_pool(monkeypatch):
    import ray

    from raymtl.predict import _prepare_pool

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    sizes = lambda *args: (lambda s: (s.min_size, s.max_size))(_prepare_pool(*args))  # noqa: E731
    assert sizes(1, None, 10_000, 64) == (6, 6)  # 8 CPUs - 1 model actor - 1 for reads/writes; fixed model pool
    assert sizes(1, 4, 10_000, 64) == (6, 24)  # 6 decoders per model actor, for each actor the pool may add
    assert sizes(2, 3, 10_000, 64) == (5, 8)  # 5 per 2 actors: ceil(5 * 3 / 2)
    assert sizes(1, 4, 300, 64) == (5, 5)  # never more than one per batch of the input
    assert sizes(1, 4, 100, 64) == (2, 2)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    assert sizes(1, 2, 10_000, 64) == (1, 2)  # at least one, even on a cluster without a CPU to spare
    assert sizes(1, 2, 10_000, 64, 1.0) == (1, 2 * DECODERS_PER_GPU_NODE)  # GPU nodes will join for the models


def test_a_decoding_pool_grows_onto_the_gpu_nodes_an_autoscaler_starts_for_the_model(monkeypatch):
    """On a cluster at rest (a CPU-0 head, GPU workers at 0 replicas) the CPUs now are none: the
    decoding pool was one actor for the whole run, however many GPU nodes joined for the model."""
    import ray

    from raymtl.predict import _prepare_pool

    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    pool = _prepare_pool(4, None, 1_000_000, 64, 1.0)
    assert (pool.min_size, pool.max_size) == (1, 4 * DECODERS_PER_GPU_NODE)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 28.0, "GPU": 4.0})  # they joined: as before
    pool = _prepare_pool(4, None, 1_000_000, 64, 1.0)
    assert (pool.min_size, pool.max_size) == (23, 23)


def test_a_model_pool_that_cannot_grow_to_its_size_is_refused(model_dir, items_file, tmp_path):
    with pytest.raises(ConfigError, match="pool_size <= max_pool_size"):
        predict(model_dir, items_file, str(tmp_path / "out"), pool_size=2, max_pool_size=1)
