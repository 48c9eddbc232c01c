"""Sweeps: the `sweep:` section, trial expansion, the grouping search step, the choice and summary
(no Ray); on the shared Ray cluster, one small real sweep of two concurrent Tune trials and one
where ASHA stops a trial early."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import raymtl
from raymtl.cli import build_parser, main
from raymtl.config import ConfigError, load_experiment
from raymtl.data.planted import make_planted, planted_experiment
from raymtl.tune import sweep
from raymtl.train.affinity import AffinityTracker
from raymtl.tune.candidates import Candidate, candidates, read_affinity
from raymtl.tune.records import SweepResult, TrialRecord, choose, format_summary, write_summary
from raymtl.tune.spec import AshaSpec, Range, SweepSpec, apply_config, load_sweep, n_trials, param_space, trial_experiment

TASKS = ["c0_t0", "c0_t1", "c1_t0", "c1_t1"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_planted(tmp_path_factory.mktemp("planted"), n_per_task=40)


@pytest.fixture
def exp(catalogue, tmp_path):
    return planted_experiment(catalogue, str(tmp_path / "runs"), name="sw")


def write_config(tmp_path: Path, exp, sweep_section) -> Path:
    raw = {**exp.to_dict(), "sweep": sweep_section}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- parsing and validation


def test_load_sweep_parses_typed_fields(exp, tmp_path):
    path = write_config(tmp_path, exp, {
        "groupings": "search", "max_groups": 3, "top": 1, "seeds": [0, 1],
        "backbones": ["resnet18", "resnet34"], "lr": {"min": 1e-4, "max": 1e-2},
        "sampler": ["shuffled", "temperature"], "temperature": [2, 4], "num_samples": 2,
        "asha": {"grace_period": 1}, "metric": "val/c0_t0/accuracy",
    })
    loaded, spec = load_sweep(path)
    assert loaded.task_names == TASKS
    assert spec.groupings == "search" and spec.max_groups == 3 and spec.seeds == [0, 1]
    assert spec.lr == Range(1e-4, 1e-2, log=True)  # `1e-4` in YAML is a float, not a string
    assert spec.temperature == [2.0, 4.0] and spec.asha.reduction_factor == 2.0
    assert (spec.metric, spec.mode, spec.max_concurrent) == ("val/c0_t0/accuracy", "max", None)  # None: what fits


def test_raymtl_train_reads_the_same_file_without_its_sweep_section(exp, tmp_path):
    path = write_config(tmp_path, exp, {"seeds": [0, 1]})
    assert load_experiment(path) == load_sweep(path)[0] == exp


def test_a_config_without_sweep_section_is_refused(exp, tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()))
    with pytest.raises(ConfigError, match="top-level `sweep:` section"):
        load_sweep(path)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"seed": [1]}, r"unknown key 'sweep.seed' \(did you mean 'seeds'\?\)"),
        ({"groupings": "serch"}, "sweep.groupings: expected a list of groupings or 'search'"),
        ({"groupings": [{"a": TASKS[:3]}]}, r"sweep.groupings\[0\]: tasks \['c1_t1'\] are in no task group"),
        ({"groupings": [{"a": TASKS, "b": ["c0_t0"]}]}, r"groupings\[0\]: task 'c0_t0' is in two task groups"),
        ({"backbones": ["resnet18", "resnet19"]}, r"sweep.backbones\[1\]: .*did you mean 'resnet18'"),
        ({"sampler": ["uniform", "temprature"]}, r"sweep.sampler\[1\]: .*did you mean 'temperature'"),
        ({"batch_size": [16, 0]}, r"sweep.batch_size\[1\]: training.batch_size: must be >= 1"),
        ({"seeds": []}, "sweep.seeds: an empty list"),
        ({"seeds": [1, 1]}, "sweep.seeds: duplicate values"),
        ({"lr": {"min": 1e-2, "max": 1e-4}}, "sweep.lr: need 0 < min < max"),
        ({"lr": {"min": -0.01, "max": 0.01, "log": False}}, r"sweep.lr: need 0 < min < max .*got min=-0.01"),
        ({"lr": {"min": 1e-4, "max": math.inf}}, r"sweep.lr: need 0 < min < max \(finite\)"),
        ({"lr": {"min": 1e-4, "maxx": 1e-2}}, r"unknown key 'sweep.lr.maxx' \(did you mean 'max'\?\)"),
        ({"lr": {"min": 1e-4}}, "missing required key 'sweep.lr.max'"),
        ({"lr": "fast"}, "sweep.lr: expected a list"),
        ({"metric": "val/colour/accuracy"}, "sweep.metric: unknown value 'val/colour/accuracy'"),
        ({"metric": "train/mean_loss_ewma"}, "sweep.metric: unknown value 'train/mean_loss_ewma'.*choose one of val/"),
        ({"mode": "maximum"}, "sweep.mode: must be 'min' or 'max'"),
        ({"top": 0}, "sweep.top: must be >= 1"),
        ({"num_samples": 3}, "sweep.num_samples: repeats would be identical trials"),
        ({"asha": {"max_t": 1, "grace_period": 2}}, "sweep.asha: need 1 <= grace_period <= max_t"),
        ({"asha": {"reduction_factor": 1}}, "sweep.asha.reduction_factor: must be > 1"),
    ],
)
def test_sweep_errors_name_the_key_at_fault(exp, tmp_path, section, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(write_config(tmp_path, exp, section))
    assert str(info.value).startswith(str(tmp_path / "sweep.yaml"))


@pytest.mark.parametrize("section", ["sweep: []\n", "sweep: 0\n"])
def test_a_sweep_section_that_is_not_a_mapping_is_refused(exp, tmp_path, section):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()) + section)
    with pytest.raises(ConfigError, match=f"^{path}: sweep: expected a mapping, got"):
        load_sweep(path)


def test_experiment_errors_still_name_their_key(exp, tmp_path):
    raw = {**exp.to_dict(), "trainig": {}, "sweep": {}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        load_sweep(path)


# ---------------------------------------------------------------- trial expansion


def test_grid_is_groupings_times_seeds_times_backbones(exp):
    from ray.tune.search.variant_generator import generate_variants

    spec = SweepSpec(seeds=[0, 1, 2], backbones=["resnet18", "resnet34"], lr=Range(1e-4, 1e-2)).validate(exp)
    groupings = {"one_group": {"g0": TASKS}, "pairs": {"a": TASKS[:2], "b": TASKS[2:]}}
    space = param_space(spec, list(groupings), exp.seed)
    configs = [config for _, config in generate_variants(space)]
    assert n_trials(space) == len(configs) == 2 * 3 * 2
    assert {(c["grouping"], c["seed"], c["backbone"]) for c in configs} == {
        (g, s, b) for g in groupings for s in (0, 1, 2) for b in ("resnet18", "resnet34")
    }
    assert len({c["lr"] for c in configs}) == 1 and 1e-4 <= configs[0]["lr"] <= 1e-2  # one draw of the range
    trial = trial_experiment(exp, spec, groupings, configs[0], "t0", "/runs")
    assert trial.task_groups() == groupings[configs[0]["grouping"]]
    assert (trial.seed, trial.model.image_backbone, trial.training.lr) == (
        configs[0]["seed"], configs[0]["backbone"], configs[0]["lr"]
    )
    assert (trial.name, trial.storage_path) == ("t0", "/runs")
    assert (trial.training.checkpoint_metric, trial.training.checkpoint_mode) == ("val/mean_score", "max")


def test_a_drawn_learning_rate_trains_every_seed_so_the_choice_averages_them(exp):
    """Tune sampled a range per trial, so each seed had its own lr and no configuration had two seeds:
    the "mean over seeds" was one trial's luck and its ensemble had one member."""
    from ray.tune.search.variant_generator import generate_variants

    spec = SweepSpec(seeds=[0, 1, 2], lr=Range(1e-4, 1e-2), num_samples=2).validate(exp)
    space = param_space(spec, ["one_group"], exp.seed)
    configs = [config for _, config in generate_variants(space)]
    lrs = sorted({c["lr"] for c in configs})
    assert n_trials(space) == len(configs) == 6 and len(lrs) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(sorted(c["seed"] for c in configs if c["lr"] == lr) == [0, 1, 2] for lr in lrs)
    assert param_space(spec, ["one_group"], exp.seed) == space  # a resumed sweep draws the same values
    trials = [TrialRecord(f"t{i}", c, 1.0, {"val/mean_score": 0.5 + c["lr"]}, 1, None) for i, c in enumerate(configs)]
    choice = choose(trials, "val/mean_score", "max")
    assert choice.config == {"grouping": "one_group", "lr": lrs[1]} and len(choice.members) == 3


def test_unlisted_axes_keep_the_experiment_values(exp):
    space = param_space(SweepSpec(), ["config"], exp.seed)
    assert list(space) == ["grouping"]
    same = apply_config(exp, {})
    assert same == exp
    changed = apply_config(exp, {"batch_size": 8, "sampler": "uniform", "temperature": 3.0})
    tr = changed.training
    assert (tr.batch_size, tr.sampler, tr.temperature) == (8, "uniform", 3.0)
    assert changed.training.lr == exp.training.lr


def test_without_asha_every_trial_runs_to_the_end(exp):
    assert sweep.scheduler(exp, SweepSpec()) is None


def test_asha_lets_a_staged_trial_finish_its_fusion_stages(exp):
    """A staged trial reports its fusion stages' epochs (4 here), more than `epochs` (2): ASHA's
    horizon is the longest trial's, so it no longer stops every staged trial after its frozen stage."""
    import types

    from raymtl.config import StageSpec

    training = dataclasses.replace(exp.training, epochs=2, fusion_stages=[
        StageSpec(epochs=2, freeze=["image", "text"]), StageSpec(epochs=2)])
    asha = sweep.scheduler(dataclasses.replace(exp, training=training),
                           SweepSpec(recipes=["joint", "staged"], asha=AshaSpec(grace_period=3)))
    asha.set_search_properties("val/mean_score", "max")
    trial = types.SimpleNamespace(trial_id="staged")
    asha.on_trial_add(None, trial)
    assert [asha.on_trial_result(None, trial, {"epoch": e, "val/mean_score": 0.5}) for e in (2, 3)] == [
        "CONTINUE", "CONTINUE"]
    assert asha.on_trial_result(None, trial, {"epoch": 4, "val/mean_score": 0.5}) == "STOP"  # its last epoch


# ---------------------------------------------------------------- groupings and the search step


def planted_z() -> torch.Tensor:
    """Tasks of one cluster help each other (0.3), the two clusters interfere (-0.1)."""
    same = torch.tensor([[int(i // 2 == j // 2) for j in range(4)] for i in range(4)], dtype=torch.float64)
    return 0.3 * same - 0.1 * (1 - same)


def write_affinity(run_dir: Path, z: torch.Tensor) -> None:
    tracker = AffinityTracker(TASKS)
    tracker.update(z)
    tracker.save(run_dir / "affinity.json")


def test_read_affinity_round_trips_the_tracker_file(tmp_path):
    write_affinity(tmp_path, planted_z())
    tasks, z = read_affinity(str(tmp_path))
    assert tasks == TASKS and torch.equal(z, planted_z())
    with pytest.raises(ConfigError, match="measured no affinity"):
        read_affinity(str(tmp_path / "nothing"))


def test_search_candidates_are_ranked_groupings_plus_baselines(exp):
    spec = SweepSpec(groupings="search", max_groups=2, top=3)
    found = candidates(exp, spec, (TASKS, planted_z()))
    names = [c.name for c in found]
    assert names[:2] == ["one_group", "one_per_task"]
    assert found[2].groups == {"g0": ["c0_t0", "c0_t1"], "g1": ["c1_t0", "c1_t1"]}  # the planted clusters
    assert found[2].score == pytest.approx(4 * 0.3)
    assert found[0].score == pytest.approx(4 * (0.3 - 0.2) / 3) and found[1].score == 0.0
    assert all(c.score <= found[2].score for c in found)
    with pytest.raises(ConfigError, match="measured for tasks"):
        candidates(exp, spec, (["x", "y"], torch.zeros(2, 2)))


def test_listed_groupings_equal_to_a_baseline_are_trained_once(exp):
    spec = SweepSpec(groupings=[{"all": TASKS}, {"a": TASKS[:2], "b": TASKS[2:]}])
    found = candidates(exp, spec, None)
    assert [c.name for c in found] == ["one_group", "one_per_task", "grouping2"]
    assert all(c.score is None for c in found)
    assert [c.name for c in candidates(exp, SweepSpec(baselines=False), None)] == ["config"]


def test_search_step_reads_the_affinity_run_once_and_keeps_its_choice(exp, tmp_path, monkeypatch):
    runs = []

    def fake_affinity_run(exp, spec, sweep_dir, address=None):
        run_dir = Path(sweep_dir) / "affinity"
        write_affinity(run_dir, planted_z())
        runs.append(run_dir)
        return str(run_dir)

    monkeypatch.setattr(sweep, "_affinity_run", fake_affinity_run)
    spec = SweepSpec(groupings="search", top=1, baselines=False)
    found, _ = sweep.load_or_search(exp, spec, str(tmp_path))
    assert [c.groups for c in found] == [{"g0": ["c0_t0", "c0_t1"], "g1": ["c1_t0", "c1_t1"]}]
    again, _ = sweep.load_or_search(exp, spec, str(tmp_path))  # a resumed sweep: no second search run
    assert again == found and len(runs) == 1
    assert json.loads((tmp_path / "candidates.json").read_text())["candidates"][0]["name"] == "search1"


# ---------------------------------------------------------------- choice and summary


def record(trial_id, grouping, seed, scores, epochs=1, error=None) -> TrialRecord:
    best = None
    if scores:
        best = {f"val/{t}/accuracy": s for t, s in zip(TASKS, scores)}
        best["val/mean_score"] = sum(scores) / len(scores)
    config = {"grouping": grouping, "seed": seed}
    return TrialRecord(trial_id, config, 1800.0, best, epochs, f"/ck/{trial_id}", error)


def fake_result() -> SweepResult:
    trials = [
        record("t0", "one_group", 0, [0.7, 0.7, 0.6, 0.6]),
        record("t1", "one_group", 1, [0.7, 0.7, 0.6, 0.6]),
        record("t2", "search1", 0, [0.9, 0.9, 0.9, 0.9]),  # the single best trial ...
        record("t3", "search1", 1, [0.5, 0.5, 0.5, 0.5]),  # ... but a poor mean over seeds
        record("t4", "one_per_task", 0, [0.75] * 4),
        record("t5", "one_per_task", 1, [0.8] * 4),
        record("t6", "one_per_task", 2, None, epochs=0, error="worker died"),
    ]
    found = [
        Candidate("one_group", {"g0": TASKS}, 0.1),
        Candidate("one_per_task", {f"g{k}": [t] for k, t in enumerate(TASKS)}, 0.0),
        Candidate("search1", {"g0": TASKS[:2], "g1": TASKS[2:]}, 1.2),
    ]
    return SweepResult("/sweep", "val/mean_score", TASKS, found, trials, None, search_s=900.0)


def test_choice_averages_ensemble_members_and_picks_the_best_member():
    result = fake_result()
    choice = choose(result.trials, "val/mean_score", "max")
    assert choice.config == {"grouping": "one_per_task"}
    assert choice.score == pytest.approx(0.775) and choice.trial_id == "t5"
    assert choice.members == ["t4", "t5"]  # the failed member does not count
    worst = choose(result.trials, "val/mean_score", "min")
    assert worst.config == {"grouping": "one_group"} and worst.trial_id == "t0"  # equal members: the first
    assert choose([record("x", "one_group", 0, None)], "val/mean_score", "max") is None


def test_a_configuration_with_a_diverged_seed_is_not_chosen_on_its_survivors():
    """A seed that trained and never scored (NaN) would leave the lucky survivor's score as the mean;
    a seed lost to a failure (an error) is only left out."""
    trials = [
        record("a0", "search1", 0, [0.91] * 4),
        record("a1", "search1", 1, None, epochs=2),  # diverged: it ran, no number
        record("b0", "one_group", 0, [0.89] * 4),
        record("b1", "one_group", 1, [0.9] * 4),
        record("c0", "one_per_task", 0, [0.95] * 4),
        record("c1", "one_per_task", 1, None, epochs=0, error="node lost"),
    ]
    choice = choose(trials, "val/mean_score", "max")
    assert choice.config == {"grouping": "one_per_task"} and choice.members == ["c0"]
    assert choose(trials[:4], "val/mean_score", "max").config == {"grouping": "one_group"}
    assert choose(trials[:2], "val/mean_score", "max").members == ["a0"]  # nothing else to choose


def test_summary_table_json_and_csv(tmp_path):
    result = fake_result()
    result.sweep_dir = str(tmp_path)
    result.choice = choose(result.trials, "val/mean_score", "max")
    result.best_model = str(tmp_path / "best_model")
    rows = result.rows()
    assert rows[2]["groups"] == "c0_t0+c0_t1 | c1_t0+c1_t1" and rows[2]["val/c0_t0/accuracy"] == 0.9
    assert [r["chosen"] for r in rows] == ["", "", "", "", "", "*", ""]
    assert result.trial_hours == pytest.approx(3.5) and result.total_hours == pytest.approx(3.75)
    text = format_summary(result)
    assert "c0_t0 acc" in text and '{"grouping": "one_per_task"}' in text and "3.750 trial-hours" in text
    assert "chosen:      none" not in text
    result.ensemble = {"split": "test", "mean_score": 0.9, "best_member_score": 0.8, "members": ["t4", "t5"],
                       "model": "m"}
    assert "ensemble:    test mean_score 0.9000 (best member 0.8000 on test), 2 member(s)" in format_summary(result)
    write_summary(result)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["choice"]["trial_id"] == "t5" and saved["errors"] == {"t6": "worker died"}
    assert saved["cost_hours"] == {"search": 0.25, "trials": 3.5, "total": 3.75}
    csv_lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and "val/c1_t1/accuracy" in csv_lines[0]


def test_cli_has_a_tune_verb(tmp_path, capsys):
    args = build_parser().parse_args(["tune", "s.yaml", "--max-concurrent", "3", "--workers", "2"])
    assert (args.config, args.max_concurrent, args.workers) == ("s.yaml", 3, 2)
    assert main(["tune", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- a real sweep


@pytest.mark.timeout(600)
def test_two_concurrent_trials_report_per_task_metrics(ray_cluster, tmp_path_factory):
    """Two groupings (a listed one equal to the all-in-one baseline is trained once), one worker each."""
    root = tmp_path_factory.mktemp("sweep")
    cat = make_planted(root / "data", n_clusters=1, tasks_per_cluster=2, n_per_task=40, n_test=16)
    exp = planted_experiment(cat, str(root / "runs"), name="tiny", training={"epochs": 1})
    spec = SweepSpec(groupings=[{"both": ["c0_t0", "c0_t1"]}], max_concurrent=2, ensemble=True)
    result = sweep.run_sweep(exp, spec)

    assert sorted(t.config["grouping"] for t in result.trials) == ["one_group", "one_per_task"]
    for trial in result.trials:
        assert trial.error is None and trial.epochs == 1 and trial.wall_s > 0
        epoch_rows = [json.loads(line) for line in (Path(result.sweep_dir) / "runs" / trial.trial_id
                                                    / "metrics.jsonl").read_text().splitlines()]
        for key in [f"val/{task}/accuracy" for task in exp.task_names] + ["val/mean_score", "global_step"]:
            assert trial.best[key] == epoch_rows[0][key]  # Tune's record of the epoch is the run's own
        tune_dir = Path(result.sweep_dir) / "tune" / trial.trial_id
        assert list(tune_dir.glob("events.out.tfevents*")), tune_dir  # Tune's TensorBoard logger
        progress = (tune_dir / "progress.csv").read_text()
        assert "val/c0_t0/accuracy" in progress  # per-epoch reports reached the Tune trial
    assert result.choice is not None and result.best_model == str(Path(result.sweep_dir) / "best_model")
    assert raymtl.load(result.best_model).tasks == exp.task_names
    summary = json.loads((Path(result.sweep_dir) / "summary.json").read_text())
    assert summary["choice"]["trial_id"] == result.choice.trial_id
    assert (Path(result.sweep_dir) / "summary.csv").is_file()
    ensemble = summary["ensemble"]  # the chosen grouping's one seed, beside itself on the test split
    assert ensemble["members"] == [result.choice.trial_id] and raymtl.load(ensemble["model"]).tasks == exp.task_names
    assert ensemble["split"] == "test" and ensemble["metrics"]["c0_t0"]["rows"] == 16
    assert ensemble["mean_score"] == pytest.approx(ensemble["best_member_score"], abs=1e-6)  # one member = itself

    again = sweep.run_sweep(exp, spec)  # restores the finished Tune experiment: nothing retrains
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in result.trials]
    assert [t.best for t in again.trials] == [t.best for t in result.trials]


def entropy(labels) -> float:
    """The loss of the best constant prediction: the label prior's entropy (nats)."""
    p = float(np.mean(labels))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


@pytest.mark.timeout(600)
def test_asha_stops_the_worse_trial_early_and_the_better_one_beats_chance(ray_cluster, tmp_path_factory):
    """Two trials, one after the other: lr 3e-3, then 1e-7 (it barely moves). At epoch 1 (the first
    rung; halving) ASHA finds the second's validation loss worse than the first's and stops it; the
    first runs all 3 epochs and predicts better than any constant (each task's label prior)."""
    root = tmp_path_factory.mktemp("asha")
    cat = make_planted(root / "data", n_clusters=1, tasks_per_cluster=2, n_per_task=160)
    exp = planted_experiment(cat, str(root / "runs"), name="asha", training={"epochs": 3})
    spec = SweepSpec(lr=[3e-3, 1e-7], baselines=False, max_concurrent=1, metric="val/mean_loss", mode="min",
                     asha=AshaSpec(grace_period=1, reduction_factor=2))
    result = sweep.run_sweep(exp, spec)

    by_lr = {t.config["lr"]: t for t in result.trials}
    assert all(t.error is None for t in result.trials)
    assert by_lr[3e-3].epochs == 3 and by_lr[1e-7].epochs == 1, [(t.config, t.epochs) for t in result.trials]
    for task in exp.task_names:
        chance = entropy(pd.read_parquet(cat[task]["val"])["label"])
        assert by_lr[3e-3].best[f"val/{task}/loss"] < chance - 0.05, (task, chance, by_lr[3e-3].best)


# ---------------------------------------------------------------- the cluster a sweep runs on


def test_tune_address_sends_the_search_run_to_the_cluster(exp, tmp_path, monkeypatch):
    from raymtl import cli, ray_runtime
    from raymtl.train import trainer

    seen = []
    monkeypatch.setattr(ray_runtime, "ensure_ray", lambda address=None, **_: seen.append(("sweep", address)))

    def fit(search, *, address=None, raise_on_error=True):
        seen.append((search.name, address))
        raise RuntimeError("stop after the search run's start")

    monkeypatch.setattr(trainer, "fit", fit)
    path = write_config(tmp_path, exp, {"groupings": "search", "top": 1})
    assert cli.main(["tune", str(path), "--address", "ray://head:10001"]) == 1
    assert seen == [("sweep", "ray://head:10001"), ("affinity", "ray://head:10001")]


def test_a_sweeps_in_process_decode_leaves_the_sweeps_cluster_running(ray_cluster, catalogue, tmp_path, monkeypatch):
    """The search run trains in the driver beside the local cluster the sweep started (here: the
    session's, marked as started by this command) and decodes its cache there; the cluster stays."""
    from raymtl import ray_runtime
    from raymtl.train.trainer import fit

    monkeypatch.setattr(ray_runtime, "_started_here", True)
    exp = planted_experiment(catalogue, str(tmp_path / "runs"), name="search", data={"cache": "always"},
                             training={"epochs": 1})
    result = fit(exp)
    assert result.checkpoint and ray_cluster.is_initialized()
    assert ray_cluster.get(ray_cluster.put(1)) == 1


# ---------------------------------------------------------------- one data plane per sweep


def test_a_sweep_reads_and_decodes_its_inputs_once_for_all_trials(exp, monkeypatch):
    """The driver builds the inputs once (cached: decoded once) and every trial trains on that object."""
    from ray import tune

    from raymtl import ray_runtime
    from raymtl.data import datasets
    from raymtl.train import trainer

    built, handed = [], []
    monkeypatch.setattr(ray_runtime, "ensure_ray", lambda address=None, **_: None)
    monkeypatch.setattr(datasets, "build_inputs", lambda e, infos, *, cache=False: built.append(cache) or object())

    class Stop(Exception):
        pass

    def trials(exp, spec, infos, found, sweep_dir, inputs=None):
        for i, candidate in enumerate(found):  # each trial as Tune would run it, here in turn
            monkeypatch.setattr(tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: f"t{i}"})())
            sweep._train_trial({"grouping": candidate.name}, exp=exp, spec=spec, infos=infos,
                               groupings={c.name: c.groups for c in found}, runs_dir=sweep_dir, env={}, inputs=inputs)
        raise Stop

    monkeypatch.setattr(trainer, "fit_here", lambda trial, infos, inputs=None: handed.append((trial.name, inputs)))
    monkeypatch.setattr(sweep, "_run_trials", trials)
    cached = dataclasses.replace(exp, data=dataclasses.replace(exp.data, cache="always"))
    with pytest.raises(Stop):
        sweep.run_sweep(cached, SweepSpec(seeds=[0]))
    assert built == [True]  # read once, decoded once
    assert [name for name, _ in handed] == ["t0", "t1"]  # one_group, one_per_task: both in their trial's process
    assert handed[0][1] is handed[1][1] is not None  # the same inputs object


@pytest.mark.timeout(300)
def test_a_trial_in_its_own_process_decodes_outside_its_placement_group(ray_cluster, tmp_path):
    """Tune's trial captures the tasks it starts into its placement group, whose one bundle its own
    process holds: a one-worker trial streaming its data (data.cache: never, or data too large) would
    wait for ever on its first decode task. Decode tasks run on the cluster's free CPUs instead."""
    import ray
    from ray import tune

    from raymtl.data import datasets

    def trial(config):
        assert ray.util.get_current_placement_group() is not None  # the capture this test is about
        tune.report({"decoded": ray.get(datasets._warm_decoder.remote([]), timeout=60)})

    tuner = tune.Tuner(tune.with_resources(trial, {"CPU": 1}),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="capture"))
    [result] = tuner.fit()
    assert result.error is None and result.metrics["decoded"] == 0


def test_a_trial_that_diverged_leaves_the_others_records(tmp_path):
    """A trial whose metric is NaN at every epoch has no best epoch; it failed the whole sweep's
    records before (Tune's filtered get_dataframe raises on an all-NaN column)."""
    import types

    def result(trial_id, scores):
        frame = pd.DataFrame({"val/mean_loss": scores, "epoch": list(range(1, len(scores) + 1)),
                              "trial_id": [trial_id] * len(scores)})
        return types.SimpleNamespace(path=str(tmp_path / trial_id), config={"grouping": trial_id}, error=None,
                                     metrics_dataframe=frame, metrics={**frame.iloc[-1].to_dict(), "time_total_s": 5.0})

    grid = [result("t0", [float("nan"), float("nan")]), result("t1", [0.9, 0.4, 0.6])]
    diverged, fine = sweep._records(grid, str(tmp_path), SweepSpec(metric="val/mean_loss", mode="min"))
    assert (diverged.best, diverged.epochs) == (None, 2)
    assert (fine.best["val/mean_loss"], fine.best["epoch"], fine.epochs, fine.wall_s) == (0.4, 2, 3, 5.0)
    assert choose([diverged, fine], "val/mean_loss", "min").trial_id == "t1"


def test_a_grouping_with_a_group_named_as_a_module_attribute_is_refused_before_ray(exp, monkeypatch):
    """Each trial of it failed inside Ray as its model was built (ModuleDict refuses 'train')."""
    from raymtl import ray_runtime

    monkeypatch.setattr(ray_runtime, "ensure_ray", lambda address=None: pytest.fail("Ray was started"))
    spec = SweepSpec(groupings=[{"g0": TASKS}, {"train": TASKS[:2], "eval_": TASKS[2:]}], seeds=[0])
    with pytest.raises(ConfigError, match=r"sweep.groupings\[1\]: model.groups group name\(s\) \['train'\]"):
        sweep.run_sweep(exp, spec)
