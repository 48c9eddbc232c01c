"""`raymtl evaluate`: metrics equal to ones computed by hand, Δ% as LibMTL defines it.

The model is tiny and untrained; its small splits are scored by prediction's two stages without Ray,
one slow test scores them on Ray Data's actors too.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from raymtl.cli import build_parser, main
from raymtl.config import ConfigError, Experiment, TaskSpec
from raymtl.data.planted import make_planted, planted_experiment
from raymtl.data.synthetic import default_tokenizer_path
from raymtl.data.task_info import TaskInfo
from raymtl.evaluate import Evaluation, TaskScore, _PrepareEach, _ScoreEach, _task_rows, by_task, compare, evaluate, tagged
from raymtl.predict.plan import make_plan
from test_ensemble_model import TASKS, member_probs, save_tiny
from test_predict import counted_loads, no_ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, experiment whose tasks a and b read planted data with 0/1 labels)."""
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny(root / "model", 0, {"all": list(TASKS)})
    catalogue = make_planted(root / "data", clusters=[list(TASKS)], n_per_task=30)
    exp = planted_experiment(catalogue, str(root / "runs"), name="eval")
    return model, exp


def scored(plan, items: pd.DataFrame) -> dict[str, np.ndarray]:
    """One task's rows through evaluation's two stages, in this process: its probs, labels, bad rows."""
    return by_task(_ScoreEach([plan], use_gpu=False)(_PrepareEach([plan])(tagged(items, 0))))[0]


def task_metrics(info, batches) -> dict[str, float]:
    score = TaskScore(info)
    for batch in batches:
        score.update(batch)
    return score.metrics()


def by_hand(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 over the present classes and cross-entropy of the probabilities."""
    pred = probs.argmax(1)
    f1 = []
    for c in range(probs.shape[1]):
        tp, fp, fn = ((pred == c) & (labels == c)).sum(), ((pred == c) & (labels != c)).sum(), ((pred != c) & (labels == c)).sum()
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    return {"accuracy": (pred == labels).mean(), "macro_f1": np.mean(f1), "loss": loss}


def test_metrics_of_the_scoring_stage_match_metrics_by_hand(setup):
    model, exp = setup
    import raymtl

    saved = raymtl.load(model)
    for spec in exp.tasks:
        items = pd.read_parquet(spec.validation)
        plan = make_plan(model, saved, tasks=[spec.name], image_column="image", id_column="id", label_column="label")
        batch = scored(plan, items)
        got = task_metrics(saved.infos[spec.name], [batch, batch])  # two batches: counts add up
        expected = by_hand(member_probs(model, items)[spec.name], items["label"].to_numpy())
        assert got["rows"] == 2 * len(items) and got["bad_rows"] == 0
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), key


def test_rows_of_tasks_mixed_in_a_batch_are_scored_as_each_tasks_own(tmp_path):
    """The stream of every task: a batch interleaving a 2-label and a 3-label task's rows gives each
    task the probabilities, labels and bad rows it gets alone, in its rows' order."""
    import raymtl

    model = save_tiny(tmp_path / "model", 1, {"all": list(TASKS)}, labels={"b": ["0", "1", "2"]})
    catalogue = make_planted(tmp_path / "data", clusters=[list(TASKS)], n_per_task=30)
    exp = planted_experiment(catalogue, str(tmp_path / "runs"))
    saved = raymtl.load(model)
    plans = [make_plan(model, saved, tasks=[t], image_column="image", id_column="id", label_column="label") for t in TASKS]
    items = [pd.read_parquet(exp.task(t).validation) for t in TASKS]
    items[1].loc[1, "image"] = str(tmp_path / "missing.jpg")  # a bad row of b
    mixed = pd.concat([tagged(items[0], 0), tagged(items[1], 1)]).sort_index(kind="stable").reset_index(drop=True)
    assert mixed["task"].tolist()[:4] == [0, 1, 0, 1]
    both = by_task(_ScoreEach(plans, use_gpu=False, saved=saved)(_PrepareEach(plans)(mixed)))
    for k, plan in enumerate(plans):
        alone = scored(plan, items[k])
        assert both[k].keys() == alone.keys() == {"probs", "label", "bad"}
        for key in alone:
            assert np.array_equal(both[k][key], alone[key]), (k, key)
    assert both[0]["probs"].shape == (len(items[0]), 2) and both[1]["probs"].shape == (len(items[1]), 3)
    assert both[1]["bad"].tolist() == [i == 1 for i in range(len(items[1]))]


@pytest.mark.skipif(default_tokenizer_path() is None, reason="the MiniLM tokenizer is not installed")
def test_tasks_of_every_shape_in_one_stream_score_as_each_alone(tmp_path, monkeypatch):
    """An image + text multiclass task and a text-only multilabel one (the demo's color and style),
    their rows mixed in the stream's batches, score as each task evaluated on its own."""
    from benchmarks.predict_throughput import demo_model

    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    exp, model, _ = demo_model(tmp_path, {"color": 40, "style": 40}, image_size=16, data={"image_size": 16},
                               model={"hidden_dim": 8})
    together = evaluate(model, exp, batch_size=6)  # 8 + 8 rows: the second batch holds both tasks
    for task in exp.task_names:
        alone = evaluate(model, exp, tasks=[task], batch_size=6)
        assert together.tasks[task] == pytest.approx(alone.tasks[task], abs=1e-6), task
        assert together.tasks[task]["rows"] == len(pd.read_parquet(exp.task(task).validation))
    assert {"micro_f1", "exact_match"} <= together.tasks["style"].keys()


def test_multilabel_metrics_threshold_the_probabilities():
    info = TaskInfo("tags", "multilabel", ["x", "y"], 1, 1, True, False, threshold=0.5)
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]], np.float32)
    labels = np.array([[1, 0], [0, 1], [0, 1]], np.float32)
    got = task_metrics(info, [{"probs": probs, "label": labels, "bad": np.zeros(3, bool)}])
    # predicted: {x}, {x, y}, {}: tp 2, fp 1, fn 1
    assert got["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert got["exact_match"] == pytest.approx(1 / 3)
    bce = -(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)).mean()
    assert got["loss"] == pytest.approx(bce, abs=1e-5)


def test_delta_percent_is_the_sign_corrected_mean_relative_gain():
    model = Evaluation("m", "validation", {"a": {"accuracy": 0.9, "loss": 0.3, "rows": 10, "bad_rows": 0},
                                            "b": {"accuracy": 0.5, "loss": 0.5, "rows": 10, "bad_rows": 0}})
    stl_a = Evaluation("sa", "validation", {"a": {"accuracy": 0.6, "loss": 0.6, "rows": 10, "bad_rows": 0}})
    stl_b = Evaluation("sb", "validation", {"b": {"accuracy": 0.5, "loss": 0.4, "rows": 10, "bad_rows": 0}})
    result = compare(model, [stl_a, stl_b])
    # a: acc +0.5, loss -(0.3-0.6)/0.6 = +0.5 -> +50 %; b: acc 0, loss -(0.1/0.4) -> -12.5 %
    assert result.per_task_percent == pytest.approx({"a": 50.0, "b": -12.5})
    assert result.delta_percent == pytest.approx(18.75)
    assert result.deltas["a"]["accuracy"] == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="no baseline predicts task 'b'"):
        compare(model, [stl_a])


def test_faults_are_named_before_ray_starts(setup, tmp_path):
    model, exp = setup
    import raymtl

    infos = raymtl.load(model).infos
    with pytest.raises(ConfigError, match="task 'a' has no `test:` source"):
        _task_rows(exp, infos, "test", None)
    with pytest.raises(ConfigError, match="the model has no task 'b'"):
        _task_rows(exp, {"a": infos["a"]}, "validation", ["b"])
    assert _task_rows(exp, infos, "validation", None) == {t.name: len(pd.read_parquet(t.validation)) for t in exp.tasks}
    tested = make_planted(tmp_path / "tested", clusters=[list(TASKS)], n_per_task=30, n_test=5)
    tested_exp = planted_experiment(tested, str(tmp_path / "runs"))
    assert _task_rows(tested_exp, infos, "test", None) == dict.fromkeys(TASKS, 5)


def test_a_small_split_is_scored_in_this_process_without_ray(setup, monkeypatch):
    """Splits of at most LOCAL_ROWS rows need no cluster (none is started); a larger one, `local=False`
    or GPUs asked for go to Ray Data's actors."""
    model, exp = setup
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    loads = counted_loads(monkeypatch)
    got = evaluate(model, exp, batch_size=8)
    assert len(loads) == 1  # the model, once for every task
    for spec in exp.tasks:
        items = pd.read_parquet(spec.validation)
        expected = by_hand(member_probs(model, items)[spec.name], items["label"].to_numpy())
        assert got.tasks[spec.name]["rows"] == len(items)
        for key, value in expected.items():
            assert got.tasks[spec.name][key] == pytest.approx(value, abs=1e-5), key
    for options in ({"local": False}, {"num_gpus": 0}, {"address": "ray://head:10001"}):
        with pytest.raises(RuntimeError, match="Ray was asked for"):
            evaluate(model, exp, **options)
    with monkeypatch.context() as gpus:
        gpus.setattr("raymtl.predict.actors_have_gpus", lambda: True)
        with pytest.raises(RuntimeError, match="Ray was asked for"):
            evaluate(model, exp)
    monkeypatch.setattr("raymtl.predict.LOCAL_ROWS", len(pd.read_parquet(exp.tasks[0].validation)) - 1)
    with pytest.raises(RuntimeError, match="Ray was asked for"):
        evaluate(model, exp)


def test_cli_evaluates_with_a_baseline(setup, tmp_path, capsys, monkeypatch):
    """Small splits: scored in the command's process, no Ray cluster started."""
    model, exp = setup
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(exp.to_dict()))
    out = tmp_path / "out"
    assert main(["evaluate", model, str(config), "--out", str(out), "--baseline", model, "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "Δ% vs" in printed and "+0.00" in printed  # the model against itself
    report = json.loads((out / "evaluation.json").read_text())
    for spec in exp.tasks:
        items = pd.read_parquet(spec.validation)
        expected = by_hand(member_probs(model, items)[spec.name], items["label"].to_numpy())
        for key, value in expected.items():
            assert report["tasks"][spec.name][key] == pytest.approx(value, abs=1e-5), key
    assert (out / "evaluation.csv").read_text().count("\n") == 1 + 2 * len(exp.tasks)
    parse = build_parser().parse_args
    flags = [parse(["evaluate", "m", "c", *more]).local for more in ([], ["--local"], ["--no-local"])]
    assert flags == [None, True, False]


def not_scored(*args, **kwargs):
    """Evaluation's scoring stages' stand-in where nothing may be scored."""
    raise AssertionError("scored")


def test_cli_names_a_path_that_is_no_model_before_scoring_anything(setup, tmp_path, monkeypatch, capsys):
    """A mistyped model or baseline path is a config fault (exit 2) found before the model, and every
    --modality pass of it, is scored."""
    model, exp = setup
    for stage in ("stages_here", "predictions"):
        monkeypatch.setattr(f"raymtl.evaluate.{stage}", not_scored)
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(exp.to_dict()))
    missing = str(tmp_path / "no_such_model")
    for args in ([missing, str(config)], [model, str(config), "--modality", "all", "--baseline", model, missing]):
        assert main(["evaluate", *args, "--out", str(tmp_path / "out")]) == 2
        assert f"{missing} is not a raymtl model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_scores_each_baseline_on_the_selected_tasks_it_predicts(setup, tmp_path, monkeypatch, capsys):
    """Single-task baselines of `--tasks a,b`: each scored on its own task, each task compared with its
    own; a baseline that predicts none of the selected tasks, or a task none predicts, is named before
    anything is scored."""
    import test_ensemble_model

    model, exp = setup
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    stl = []
    for k, task in enumerate(TASKS):
        with monkeypatch.context() as one_task:
            one_task.setattr(test_ensemble_model, "TASKS", (task,))
            stl.append(save_tiny(tmp_path / f"stl_{task}", 2 + k, {"all": [task]}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(exp.to_dict()))
    out = tmp_path / "out"
    assert main(["evaluate", model, str(config), "--tasks", "a,b", "--out", str(out), "--baseline", *stl,
                 "--batch-size", "8"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert [list(b["tasks"]) for b in report["baselines"]] == [["a"], ["b"]]
    for baseline, task in zip(report["baselines"], TASKS):
        accuracy = report["tasks"][task]["accuracy"] - baseline["tasks"][task]["accuracy"]
        assert report["comparison"]["deltas"][task]["accuracy"] == pytest.approx(accuracy)
    for stage in ("stages_here", "predictions"):
        monkeypatch.setattr(f"raymtl.evaluate.{stage}", not_scored)
    capsys.readouterr()
    assert main(["evaluate", model, str(config), "--tasks", "a", "--baseline", *stl, "--out", str(out / "2")]) == 2
    assert f"baseline {stl[1]!r} predicts none of the evaluated tasks ['a']" in capsys.readouterr().err
    assert main(["evaluate", model, str(config), "--baseline", stl[0], "--out", str(out / "2")]) == 2
    assert "no baseline predicts task 'b'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_data_actors_score_every_task_in_one_stream_as_this_process_does(ray_cluster, setup, tmp_path, monkeypatch):
    """Two tasks (2 and 3 labels) through one pipeline of Ray Data's actors: each task's numbers are
    the ones this process computes."""
    import raymtl.evaluate

    _, exp = setup
    model = save_tiny(tmp_path / "model", 1, {"all": list(TASKS)}, labels={"b": ["0", "1", "2"]})
    pipelines = []
    real = raymtl.evaluate.predictions
    monkeypatch.setattr(raymtl.evaluate, "predictions", lambda *args, **kw: pipelines.append(args[1]) or real(*args, **kw))
    on_ray = evaluate(model, exp, batch_size=8, local=False)
    assert [[plan.heads[0].task for plan in plans] for plans in pipelines] == [list(TASKS)]  # one stream
    here = evaluate(model, exp, batch_size=8)
    for task in TASKS:
        assert on_ray.tasks[task]["rows"] == len(pd.read_parquet(exp.task(task).validation))
        assert on_ray.tasks[task] == pytest.approx(here.tasks[task], abs=1e-6)


class Fixed(torch.nn.Module):
    """A model whose output is `logits` for every batch: training's validation without a network."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, batch, task):
        return self.logits


LOSS_CASES = {  # logits and labels of confident mistakes (softmax/sigmoid far from 0.5, not underflowing)
    "multiclass": (torch.tensor([[-25.0, 0.0, 0.0], [2.0, 0.0, -1.0], [0.0, 9.0, 0.0], [40.0, 0.0, -40.0]]),
                   torch.tensor([0, 0, 1, 2])),
    "multilabel": (torch.tensor([[-30.0, 5.0, 0.3], [4.0, -12.0, 2.0]]),
                   torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
}


@pytest.mark.parametrize("kind", LOSS_CASES)
def test_evaluate_reports_the_loss_training_validation_reports(kind):
    """One model, the same rows: `raymtl evaluate`'s loss (from the probabilities) is training's
    val/<task>/loss, the NLL without label smoothing, also for a confident mistake (25.69, not 16.1)."""
    from raymtl.models.ensemble import probabilities
    from raymtl.train.evaluation import evaluate as validate

    logits, labels = LOSS_CASES[kind]
    info = TaskInfo("t", kind, ["x", "y", "z"], 4, len(labels), True, False)
    spec = TaskSpec("t", "x.csv", kind=kind, label_smoothing=0.2 if kind == "multiclass" else 0.0)
    trained = validate(Fixed(logits), Experiment("e", [spec]), {"t": info}, [("t", {"label": labels})], "cpu")["t"]
    nll = (F.cross_entropy(logits, labels) if kind == "multiclass"
           else F.binary_cross_entropy_with_logits(logits, labels)).item()
    assert trained["loss"] == pytest.approx(nll, rel=1e-6)
    probs = probabilities(logits, kind).numpy()
    got = task_metrics(info, [{"probs": probs, "label": labels.numpy(), "bad": np.zeros(len(labels), bool)}])
    assert got["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert {k: v for k, v in got.items() if k not in ("loss", "rows", "bad_rows")} == {
        k: v for k, v in trained.items() if k != "loss"}


def test_a_probability_that_underflowed_costs_the_least_loss_it_stands_for_not_infinity():
    info = TaskInfo("t", "multiclass", ["x", "y"], 1, 1, True, False)
    got = task_metrics(info, [{"probs": np.array([[0.0, 1.0]], np.float32), "label": np.array([0]),
                               "bad": np.zeros(1, bool)}])
    assert got["loss"] == pytest.approx(-np.log(np.finfo(np.float32).smallest_subnormal))


def test_a_multilabel_probability_rounded_to_one_costs_the_least_it_stands_for():
    """sigmoid(30) is 1.0 in float32: 1 - p below half its last step, a loss of at least 17.3, not the
    103.3 of a floor at the smallest float (more than the row's true 30: evaluate read 66.6 where training 30)."""
    info = TaskInfo("t", "multilabel", ["x", "y"], 1, 1, True, False)
    probs = torch.tensor([[30.0, -30.0]]).sigmoid().numpy()
    got = task_metrics(info, [{"probs": probs, "label": np.array([[0.0, 1.0]], np.float32), "bad": np.zeros(1, bool)}])
    least = -np.log(np.finfo(np.float32).epsneg / 2)
    assert got["loss"] == pytest.approx((least + 30.0) / 2, rel=1e-5)
    assert least == pytest.approx(17.33, abs=0.01)


def test_multilabel_metrics_threshold_the_probabilities_as_prediction_does():
    """Probabilities a float32 step or two either side of the threshold (and on it) are positive in
    the metrics exactly where prediction lists their label."""
    from raymtl.predict.output import output_columns
    from raymtl.predict.plan import Head

    for threshold in (0.1, 0.3, 0.5, 0.9):
        t = np.float32(threshold)
        probs = (t + np.arange(-3, 4, dtype=np.float32) * np.spacing(t))[:, None]  # t and its neighbours
        head = Head("m", "multilabel", ("x",), threshold, ("image",))
        listed = output_columns(head, probs, np.zeros(len(probs), bool), 0)["m"].to_pylist()
        info = TaskInfo("m", "multilabel", ["x"], 1, 1, True, False, threshold=threshold)
        for p, labels in zip(probs, listed):
            row = {"probs": p[None], "label": np.ones((1, 1), np.float32), "bad": np.zeros(1, bool)}
            got = task_metrics(info, [row])
            assert got["exact_match"] == float(labels == ["x"]), (threshold, p)


def test_an_ensembles_loss_is_the_nll_of_its_averaged_probabilities(setup, tmp_path, monkeypatch):
    """Not the mean of its members' losses: the ensemble is scored as the one model it predicts as."""
    from raymtl.models.ensemble import build_ensemble

    model, exp = setup
    monkeypatch.setattr("raymtl.ray_runtime.ensure_ray", no_ray)
    other = save_tiny(tmp_path / "other", 3, {"all": list(TASKS)})
    got = evaluate(build_ensemble([model, other], str(tmp_path / "ens")), exp, batch_size=8)
    for spec in exp.tasks:
        items = pd.read_parquet(spec.validation)
        rows = np.arange(len(items)), items["label"].to_numpy()
        each = [member_probs(m, items)[spec.name][rows] for m in (model, other)]
        nll, members_nll = -np.log((each[0] + each[1]) / 2).mean(), -np.log(each).mean()
        assert abs(nll - members_nll) > 1e-4  # the two differ enough to tell apart
        assert got.tasks[spec.name]["loss"] == pytest.approx(nll, rel=1e-5), spec.name


def test_a_task_without_readable_rows_is_named_and_left_out_of_the_means(tmp_path):
    """Every row of b failed to read: its metrics are NaN, the mean score and Δ% are a's, and the
    table and evaluation.json name b."""
    from raymtl.evaluate import format_table, write_results

    unread = {"accuracy": np.nan, "macro_f1": np.nan, "loss": np.nan, "rows": 2, "bad_rows": 2}
    read = {"accuracy": 0.9, "macro_f1": 0.8, "loss": 0.3, "rows": 4, "bad_rows": 1}
    model = Evaluation("m", "validation", {"a": read, "b": unread})
    baseline = Evaluation("s", "validation", {"a": {**read, "accuracy": 0.6, "loss": 0.6}, "b": unread})
    assert model.mean_score == pytest.approx(0.9) and model.unmeasured == ["b"]
    comparison = compare(model, [baseline])
    assert comparison.delta_percent == pytest.approx(comparison.per_task_percent["a"]) == pytest.approx(100 * 1.0 / 3)
    table = format_table(model, comparison)
    assert "mean score: 0.9000" in table and "warning: no readable rows in task b: left out of the mean score" in table
    assert "Δ% vs s: +33.33  (without task b: no readable rows)" in table
    assert comparison.unmeasured == ["b"]
    assert compare(Evaluation("m", "validation", {"b": read}), [baseline]).unmeasured == ["b"]  # unread by s
    write_results(str(tmp_path), model, [baseline], comparison)
    strict = json.loads((tmp_path / "evaluation.json").read_text(), parse_constant=pytest.fail)  # no NaN token
    assert strict["tasks"]["b"]["accuracy"] is None and strict["comparison"]["per_task_percent"]["b"] is None
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["mean_score"] == pytest.approx(0.9) and report["unmeasured"] == ["b"]
    assert report["baselines"][0]["unmeasured"] == ["b"]
    assert np.isnan(Evaluation("m", "validation", {"b": unread}).mean_score)  # nothing measured


def test_a_baseline_that_read_no_row_of_a_task_is_left_out_of_its_reference_only():
    """Another baseline read it: the task is compared with that one, not dropped from Δ%."""
    read = {"accuracy": 0.9, "loss": 0.3, "rows": 4, "bad_rows": 0}
    unread = {"accuracy": np.nan, "loss": np.nan, "rows": 2, "bad_rows": 2}
    model = Evaluation("m", "validation", {"a": read})
    image_only = Evaluation("s2", "validation", {"a": {**read, "accuracy": 0.6, "loss": 0.6}})
    comparison = compare(model, [image_only, Evaluation("s3", "validation", {"a": unread})])
    assert comparison.unmeasured == [] and comparison.deltas["a"]["accuracy"] == pytest.approx(0.3)
    assert comparison.delta_percent == pytest.approx(100 * (0.5 + 0.5) / 2)


def test_a_metric_whose_baseline_is_0_is_left_out_of_delta_percent_and_named():
    """A relative gain over 0 is undefined: it counted as no change, pulling the task's mean to 0."""
    from raymtl.evaluate import format_table

    model = Evaluation("m", "validation", {"a": {"accuracy": 0.5, "macro_f1": 0.4, "loss": 0.5, "rows": 4, "bad_rows": 0}})
    base = Evaluation("s", "validation", {"a": {"accuracy": 0.0, "macro_f1": 0.0, "loss": 1.0, "rows": 4, "bad_rows": 0}})
    comparison = compare(model, [base])
    assert comparison.per_task_percent == pytest.approx({"a": 50.0})  # the loss alone: -(0.5 - 1) / 1
    assert comparison.zero_references == {"a": ["accuracy", "macro_f1"]}
    assert "note: metrics whose baseline is 0 have no relative gain, left out of Δ% (a: accuracy, macro_f1)" in \
        format_table(model, comparison)
