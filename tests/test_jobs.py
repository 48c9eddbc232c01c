"""The `ray job submit` entrypoints (jobs/*.py) run end to end, as a Ray job runs them (in-process, on
the session's Ray cluster): a sweep whose every trial fails exits non-zero, so its Ray job fails too,
and batch prediction writes one row per item for a small saved model."""

from __future__ import annotations

import runpy
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from raymtl.config import DataSpec, Experiment, ModelSpec, TaskSpec, ViewSpec
from raymtl.data.planted import make_planted, planted_experiment
from raymtl.data.synthetic import COLORS, PATTERNS, make_catalogue
from raymtl.data.task_info import TaskInfo
from raymtl.models.artifact import save_model
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.faults import CRASH_ENV
from raymtl.tune.candidates import Candidate
from raymtl.tune.records import Choice, SweepResult, TrialRecord, sweep_failure

REPO = Path(__file__).resolve().parents[1]


def run_job(script: str, *args: str, monkeypatch) -> int:
    """Run jobs/<script> as `python jobs/<script> args...` would; its exit status."""
    monkeypatch.setattr("sys.argv", [script, *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "jobs" / script), run_name="__main__")
    return done.value.code


# ---------------------------------------------------------------- the sweep's exit status, no Ray


def trial(trial_id: str, score: float | None = None, error: str | None = None) -> TrialRecord:
    best = {"val/mean_score": score} if score is not None else None
    return TrialRecord(trial_id, {"grouping": "one_group", "seed": 0}, 1.0, best=best, error=error)


def result(*trials: TrialRecord) -> SweepResult:
    choice = Choice({"grouping": "one_group"}, 0.5, "t1", ["t1"]) if any(t.best for t in trials) else None
    return SweepResult("/runs/s-sweep", "val/mean_score", ["a"], [Candidate("one_group", {"all": ["a"]})],
                       list(trials), choice)


def test_a_sweep_fails_when_every_trial_failed_or_none_reported_the_metric():
    assert sweep_failure(result(trial("t1", 0.5), trial("t2", error="boom"))) is None  # one good trial is a result
    failed = sweep_failure(result(trial("t1", error="Traceback...\nValueError: bad weights\n"), trial("t2", error="x")))
    assert failed == "all 2 trials failed (errors in /runs/s-sweep/summary.json); t1: ValueError: bad weights"
    # even after reporting an epoch: the job fails, and its retry resumes the errored trials
    assert sweep_failure(result(trial("t1", 0.5, error="lost node"))).startswith("all 1 trials failed")
    assert sweep_failure(result(trial("t1"))) == (
        "no trial reported val/mean_score (0 of 1 failed; see /runs/s-sweep/summary.json)")


def test_demo_job_writes_its_storage_and_name_into_the_config_it_trains(tmp_path, monkeypatch):
    """`jobs/train.py --config <out>/demo.yaml` re-runs or resumes the demo job's run: the config
    holds the job's --storage and --name, not the pod's home."""
    calls = []
    monkeypatch.setattr("raymtl.cli.main", lambda argv: calls.append(argv) or 0)
    out = tmp_path / "demo"
    args = ["--out", str(out), "--sizes", "color=20", "--image-size", "16", "--storage", "/mnt/shared/runs",
            "--name", "demo-b", "--workers", "2"]
    assert run_job("demo_data.py", *args, monkeypatch=monkeypatch) == 0
    config = yaml.safe_load((out / "demo.yaml").read_text())
    assert (config["storage_path"], config["name"]) == ("/mnt/shared/runs", "demo-b")
    assert calls == [["train", str(out / "demo.yaml"), "--workers", "2"]]


# ---------------------------------------------------------------- on Ray


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_job_exits_non_zero_when_every_trial_fails(ray_cluster, tmp_path, monkeypatch, capsys):
    """Both trials' workers die at their first step (no retries): every trial fails inside Ray,
    past every pre-flight check."""
    catalogue = make_planted(tmp_path / "data", n_clusters=1, tasks_per_cluster=2, n_per_task=24)
    exp = planted_experiment(catalogue, str(tmp_path / "runs"), name="doomed",
                             training={"epochs": 1, "max_failures": 0})
    monkeypatch.setenv(CRASH_ENV, "1")
    config = tmp_path / "sweep.yaml"
    sweep = {"seeds": [0, 1], "baselines": False, "max_concurrent": 2}
    config.write_text(yaml.safe_dump({**exp.to_dict(), "sweep": sweep}, sort_keys=False))

    assert run_job("tune.py", "--config", str(config), monkeypatch=monkeypatch) == 1
    err = capsys.readouterr().err
    assert "raymtl: error: all 2 trials failed" in err, err[-2000:]
    assert (tmp_path / "runs" / "doomed-sweep" / "summary.json").is_file()


def tiny_model(folder: Path) -> Path:
    """An untrained two-task image model (color, pattern), saved as training saves checkpoints."""
    tasks = [TaskSpec(name, train="unused.parquet", image_column="image", id_column="id") for name in ("color", "pattern")]
    exp = Experiment("tiny", tasks, data=DataSpec(image_size=32, views=[ViewSpec("full")]),
                     model=ModelSpec(image_backbone="resnet18", hidden_dim=16))
    labels = {"color": list(COLORS), "pattern": list(PATTERNS)}
    infos = {t.name: TaskInfo(t.name, "multiclass", labels[t.name], 10, 0, True, False) for t in tasks}
    torch.manual_seed(0)
    model = MultiTaskModel(exp.model, infos, ["full"], exp.task_groups())
    save_model(folder, model, data=exp.data, experiment=exp.to_dict())
    return folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_job_writes_a_row_per_item(ray_cluster, tmp_path, monkeypatch):
    model = tiny_model(tmp_path / "model")
    items = pd.read_parquet(make_catalogue(tmp_path / "cat", image_size=32, sizes={"color": 10})["color"]["train"])
    items = items.drop(columns="label")
    items.to_parquet(tmp_path / "items.parquet")
    out = tmp_path / "predictions"

    args = ["--model", str(model), "--input", str(tmp_path / "items.parquet"), "--output", str(out)]
    assert run_job("predict.py", *args, "--batch-size", "4", "--top-k", "2", monkeypatch=monkeypatch) == 0
    got = pd.read_parquet(out).set_index("id")
    assert sorted(got.index) == sorted(items.id) and got.error.isna().all()
    for task, labels in (("color", COLORS), ("pattern", PATTERNS)):
        assert set(got[task]) <= set(labels)
        assert (got[f"{task}_prob"] >= 1 / len(labels)).all() and (got[f"{task}_prob"] <= 1).all()  # argmax of a softmax
        assert all(len(top) == 2 and top[0]["label"] == best for top, best in zip(got[f"{task}_top_k"], got[task]))
