"""Where a run trains (`training.in_process`) and the checkpoint rules applied without a Train controller."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from raymtl.config import ConfigError, Experiment, TaskSpec, TrainingSpec
from raymtl.train.checkpoint import CHECKPOINT_METRICS_FILE, Position
from raymtl.train.in_process import Retention, trains_in_process
from raymtl.train.loop import _unmeasured_metrics


def exp_with(storage_path: str = "/tmp/runs", **training) -> Experiment:
    exp = Experiment(name="r", tasks=[TaskSpec("color", train="x.parquet", image_column="image")],
                     storage_path=storage_path, training=TrainingSpec(**training))
    return exp.validate()


@pytest.mark.parametrize("training, address, env, here", [
    ({}, None, None, True),  # one worker, nothing to join: this process
    ({"num_workers": 2}, None, None, False),
    ({}, "ray://head:10001", None, False),  # a cluster to join trains on its workers
    ({}, None, "10.0.0.1:6379", False),
    ({"in_process": "never"}, None, None, False),
    ({"in_process": "always"}, None, None, True),
])
def test_one_worker_on_a_local_machine_trains_in_this_process(monkeypatch, training, address, env, here):
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert trains_in_process(exp_with(**training), address) is here


def test_a_process_connected_to_a_cluster_trains_on_its_workers(monkeypatch):
    """A notebook that ran ray.init(address=...) (or a sweep on a cluster) never trains in the driver."""
    import types

    context = types.SimpleNamespace(gcs_address="10.0.0.1:6379")
    node = types.SimpleNamespace(head=False)  # ray.init(address=...): connected to a running cluster
    fake = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context,
                                 _private=types.SimpleNamespace(worker=types.SimpleNamespace(_global_node=node)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert not trains_in_process(exp_with(), None)
    with pytest.raises(ConfigError, match="it cannot join cluster '10.0.0.1:6379'"):
        trains_in_process(exp_with(in_process="always"), None)
    node.head = True  # ray.init() here started a local cluster: training here is fine
    assert trains_in_process(exp_with(), None)


def test_a_run_folder_in_remote_storage_trains_on_workers(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not trains_in_process(exp_with("s3://bucket/runs"), None)
    with pytest.raises(ConfigError, match="in_process: always needs a local storage_path, not 's3://bucket/runs'"):
        trains_in_process(exp_with("s3://bucket/runs", in_process="always"), None)


def test_a_remote_run_names_its_checkpoints_by_uri(monkeypatch):
    """Ray's `Checkpoint.path` drops a URI's scheme (bucket/runs/r/...): the paths `fit` returns, which
    `raymtl predict` and a staged recipe's `init_from` load, keep it."""
    import contextlib
    import types

    from raymtl.train import trainer

    def checkpoint(name):
        return types.SimpleNamespace(path=f"bucket/runs/r/{name}")

    result = types.SimpleNamespace(
        checkpoint=checkpoint("checkpoint_2"), metrics={"epoch": 2},
        best_checkpoints=[(checkpoint("checkpoint_0"), {"val/mean_loss": float("nan")}),  # NaN is never the best
                          (checkpoint("checkpoint_1"), {"val/mean_loss": 0.1}),
                          (checkpoint("checkpoint_2"), {"val/mean_loss": 0.1})])  # of equals, the older
    monkeypatch.setattr(trainer, "prepare", lambda exp: (exp, {}))
    monkeypatch.setattr(trainer, "ensure_ray", lambda address: None)
    monkeypatch.setattr(trainer, "make_trainer", lambda exp, infos: types.SimpleNamespace(fit=lambda: result))
    monkeypatch.setattr(trainer.console, "progress", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(trainer, "read_history", lambda run_dir: [])
    monkeypatch.setattr(trainer, "read_rows", lambda run_dir: [])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = trainer.fit(exp_with("s3://bucket/runs"))
    assert (out.run_dir, out.checkpoint, out.best_checkpoint) == (
        "s3://bucket/runs/r", "s3://bucket/runs/r/checkpoint_2", "s3://bucket/runs/r/checkpoint_1")


def test_always_in_process_refuses_what_one_process_cannot_do(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="it cannot join cluster 'ray://head:10001'"):
        trains_in_process(exp_with(in_process="always"), "ray://head:10001")
    with pytest.raises(ConfigError, match="in_process: always trains in one process; num_workers is 2"):
        exp_with(in_process="always", num_workers=2)
    with pytest.raises(ConfigError, match="training.in_process"):
        exp_with(in_process="sometimes")


def checkpoints(run_dir: Path, scores: list[float | None]) -> list[Path]:
    """One checkpoint folder per score, oldest first (None: reported without the metric)."""
    folders = []
    for i, score in enumerate(scores):
        folder = run_dir / f"checkpoint_2026-01-01_00-00-{i:02d}.000000"
        folder.mkdir(parents=True)
        metrics = {"epoch": i} if score is None else {"val/mean_loss": score, "epoch": i}
        (folder / CHECKPOINT_METRICS_FILE).write_text(json.dumps(metrics))
        folders.append(folder)
    return folders


def test_retention_keeps_the_best_and_the_latest(tmp_path):
    folders = checkpoints(tmp_path, [0.9, 0.3, 0.5, 0.4, 0.8])
    rule = Retention(keep=2, metric="val/mean_loss", mode="min")
    assert rule.best(str(tmp_path)) == str(folders[1])
    rule.prune(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == [folders[1], folders[3], folders[4]]  # 0.3, 0.4 and the latest
    maximize = Retention(keep=1, metric="val/mean_loss", mode="max")
    assert maximize.best(str(tmp_path)) == str(folders[4])


def test_retention_ties_keep_the_newer_and_name_the_older_best(tmp_path):
    """As Ray Train: its checkpoint manager keeps the newer of equal scores, and `get_best_checkpoint`
    (the first of equals in its ascending list) names the older."""
    folders = checkpoints(tmp_path, [0.5, 0.2, 0.2, 0.7])
    rule = Retention(keep=2, metric="val/mean_loss", mode="min")
    assert rule.best(str(tmp_path)) == str(folders[1])
    rule.prune(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == [folders[1], folders[2], folders[3]]
    keep_one = Retention(keep=1, metric="val/mean_loss", mode="min")
    keep_one.prune(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == [folders[2], folders[3]]


def test_mid_epoch_checkpoints_never_displace_the_evaluated_one(tmp_path):
    """A mid-epoch checkpoint's weights were never evaluated: it scores worst, so the epoch's
    checkpoint stays the best and is kept (it once carried the epoch's score, and the tie deleted it)."""
    exp = exp_with(checkpoint_metric="val/mean_loss", checkpoint_mode="min")
    mid = _unmeasured_metrics(exp, Position(epoch=1, history=[{"epoch": 1, "val/mean_loss": 0.2}]), "val/mean_loss")
    assert mid == {"val/mean_loss": sys.float_info.max, "epoch": 1}
    # No validation data: checkpoints rank by recency, and a mid-epoch one has no score to be named best by.
    assert _unmeasured_metrics(exp, Position(epoch=1), None) == {"epoch": 1}
    folders = checkpoints(tmp_path, [0.5, 0.2, mid["val/mean_loss"], mid["val/mean_loss"]])
    rule = Retention(keep=2, metric="val/mean_loss", mode="min")
    rule.prune(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == [folders[0], folders[1], folders[3]]  # the two epochs, the latest
    assert rule.best(str(tmp_path)) == str(folders[1])


def test_a_nan_score_is_never_the_best_nor_kept_over_a_number(tmp_path):
    """A diverged epoch (NaN) ranks last, as in Ray Train; with no number at all there is no best."""
    folders = checkpoints(tmp_path, [float("nan"), 0.5, 0.4, float("nan")])
    rule = Retention(keep=1, metric="val/mean_loss", mode="min")
    assert rule.best(str(tmp_path)) == str(folders[2])
    rule.prune(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == [folders[2], folders[3]]  # the best and the latest
    only_nan = tmp_path / "nan"
    checkpoints(only_nan, [float("nan")])
    assert rule.best(str(only_nan)) is None


def test_retention_without_a_metric_keeps_the_newest(tmp_path):
    folders = checkpoints(tmp_path, [None, None, None])
    rule = Retention(keep=2, metric=None, mode="min")
    assert rule.best(str(tmp_path)) is None
    rule.prune(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == folders[1:]


def test_a_checkpoint_folder_is_written_whole_with_its_metrics(tmp_path, monkeypatch):
    """In a local run folder a checkpoint appears under its final name complete, metrics included,
    and the retention rule runs once it is reported."""
    import ray.train

    from raymtl.train.checkpoint import report_checkpoint

    reported = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reported.append((metrics, kw["checkpoint"].path)))
    rule = Retention(keep=1, metric="val/mean_loss", mode="min")
    for loss in (0.4, 0.6, 0.5):
        report_checkpoint(str(tmp_path), lambda folder: (folder / "model.txt").write_text("w"),
                          {"val/mean_loss": loss}, rule)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert [Path(path).name for _, path in reported][0] == kept[0]  # the 0.4 one, the best
    assert kept == sorted({Path(reported[0][1]).name, Path(reported[2][1]).name})  # best + latest
    for name in kept:
        assert (tmp_path / name / "model.txt").read_text() == "w"
        assert "val/mean_loss" in json.loads((tmp_path / name / CHECKPOINT_METRICS_FILE).read_text())



def test_a_uri_run_folder_uploads_checkpoints_in_the_background_but_a_preemption_one_at_once(tmp_path, monkeypatch):
    """To remote storage Ray Train uploads a written checkpoint folder while training goes on (and
    deletes it after); the checkpoint of a preemption notice is uploaded before the step returns."""
    import ray.train
    from ray.train import CheckpointUploadMode

    from raymtl.train.checkpoint import report_checkpoint

    reported = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reported.append(kw))
    for background in (True, False):
        report_checkpoint(f"file://{tmp_path}/run", lambda folder: (folder / "model.txt").write_text("w"),
                          {"val/mean_loss": 0.4}, background=background)
    assert [kw["checkpoint_upload_mode"] for kw in reported] == [CheckpointUploadMode.ASYNC, CheckpointUploadMode.SYNC]
    for kw in reported:
        folder = Path(kw["checkpoint"].path)
        assert kw["delete_local_checkpoint_after_upload"] and (folder / "model.txt").read_text() == "w"
        assert json.loads((folder / CHECKPOINT_METRICS_FILE).read_text()) == {"val/mean_loss": 0.4}
        shutil.rmtree(folder)  # what Ray Train does once uploaded


def test_a_gpu_run_in_this_process_needs_a_visible_gpu(monkeypatch):
    import torch

    from raymtl.train.trainer import fit_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="training.use_gpu: this process sees no CUDA device"):
        fit_here(exp_with(use_gpu=True), {})


def test_a_task_metric_needs_that_tasks_validation_data():
    """Ranking by a task without validation rows ranks nothing; with no validation at all, recency ranks."""
    from raymtl.data.task_info import TaskInfo
    from raymtl.preflight import check_measured

    infos = {"color": TaskInfo("color", "multiclass", ["a", "b"], 10, 4, True, False),
             "style": TaskInfo("style", "multiclass", ["a", "b"], 10, 0, True, False)}
    with pytest.raises(ConfigError, match="training.checkpoint_metric: 'val/style/accuracy' is never measured: "
                                          "task 'style' has no validation data"):
        check_measured("val/style/accuracy", infos, "training.checkpoint_metric")
    for metric in ("val/color/accuracy", "val/mean_loss"):
        check_measured(metric, infos, "training.checkpoint_metric")
    infos["color"].n_val = 0
    check_measured("val/style/accuracy", infos, "training.checkpoint_metric")


def test_a_task_weight_scales_the_gradient_not_the_reported_training_loss(tmp_path):
    """train/<task>/loss_ewma is comparable to val/<task>/loss: a weight of 3 read 3x the validation loss.
    At lr 1e-12 both runs see the same weights and batches, so their training losses are equal."""
    import dataclasses

    from raymtl.config import load_experiment
    from raymtl.data.synthetic import make_catalogue, write_demo_config
    from raymtl.train.trainer import fit

    cat = make_catalogue(tmp_path / "data", seed=0, image_size=16, sizes={"color": 64})
    exp = load_experiment(write_demo_config(
        tmp_path / "data", cat, storage_path=str(tmp_path / "runs"), data={"image_size": 16, "views": [{"name": "full"}]},
        model={"hidden_dim": 16}, training={"batch_size": 16, "epochs": 1, "lr": 1e-12, "lr_schedule": "none"}))
    rows = [fit(dataclasses.replace(exp, name=f"weight{w}", tasks=[dataclasses.replace(t, weight=w) for t in exp.tasks]))
            .history[-1] for w in (1.0, 3.0)]
    assert rows[1]["train/color/loss_ewma"] == pytest.approx(rows[0]["train/color/loss_ewma"], rel=1e-6)
    assert rows[1]["val/color/loss"] == pytest.approx(rows[0]["val/color/loss"], rel=1e-6)
