"""Config parsing: every fault is rejected before Ray starts, with a message that names it."""

import re
from pathlib import Path
from typing import Any

import pytest

from raymtl.config import ConfigError, Experiment, load_experiment


def minimal(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "exp",
        "tasks": [
            {"name": "color", "train": "color.parquet", "image_column": "image"},
            {"name": "style", "train": "style.parquet", "kind": "multilabel", "text_column": "title"},
        ],
    }
    return {**raw, **sections}


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_file_parses_into_typed_sections(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
name: exp
tasks:
  - {name: color, train: c.parquet, image_column: image, labels: [red, 2]}
data: {image_size: 96, views: [{name: full}, {name: crop, crop: 0.5}]}
model: {groups: {look: [color]}}
training: {lr: 1e-3, batch_size: 8, stages: [{epochs: 1, freeze: [image]}]}
""",
    )
    exp = load_experiment(path)
    assert exp.tasks[0].labels == ["red", 2]
    assert exp.data.views[1].crop == 0.5 and exp.data.views[0].crop == 1.0
    assert exp.training.lr == pytest.approx(1e-3)  # YAML 1.1 would read `1e-3` as a string
    assert exp.training.stages[0].freeze == ["image"]
    assert exp.task_groups() == {"look": ["color"]}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (minimal(trainig={"epochs": 1}), "unknown key 'trainig' (did you mean 'training'?)"),
        (minimal(training={"batch_sise": 4}), "unknown key 'training.batch_sise' (did you mean 'batch_size'?)"),
        (minimal(data={"views": [{"name": "full", "corp": 0.5}]}), "'data.views[0].corp' (did you mean 'crop'?)"),
    ],
)
def test_unknown_key_suggests_closest(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_experiment(raw)


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key 'zzz'; valid keys: name, tasks"):
        load_experiment(minimal(zzz=1))


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "name: exp\ntasks: [\n  - oops: {\n")
    with pytest.raises(ConfigError, match=f"{path}: malformed YAML"):
        load_experiment(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_experiment(write_yaml(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (minimal(training={"batch_size": "32"}), "training.batch_size: expected int, got '32'"),
        (minimal(training={"epochs": True}), "training.epochs: expected int, got True"),
        (minimal(data={"views": "full"}), "data.views: expected a list"),
        (minimal(model={"groups": {"g": "color"}}), "model.groups.g: expected a list"),
        ({"name": "exp", "tasks": [{"name": "a", "train": "a.csv", "weight": "high"}]}, r"tasks\[0\].weight: expected float"),
    ],
)
def test_wrong_type_names_dotted_path(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_experiment(raw)


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'tasks\[0\].train'"):
        load_experiment({"name": "exp", "tasks": [{"name": "a"}]})


def test_duplicate_task_name() -> None:
    raw = minimal()
    raw["tasks"][1]["name"] = "color"
    with pytest.raises(ConfigError, match="duplicate task name 'color'"):
        load_experiment(raw)


@pytest.mark.parametrize("names, expected", [
    (["id", "style"], r"tasks\[0\] \('id'\): task name 'id' is a column of every prediction"),
    (["color", "error"], r"tasks\[1\] \('error'\): task name 'error' is a column of every prediction"),
    (["color", "color_prob"], "tasks 'color' and 'color_prob' would write the same prediction column 'color_prob'"),
    (["color_top_k", "color"], "tasks 'color' and 'color_top_k' would write the same prediction column"),
])
def test_task_names_do_not_clash_with_prediction_columns(names: list[str], expected: str) -> None:
    """A task named `id` would overwrite the ids predictions are joined on."""
    raw = minimal()
    for task, name in zip(raw["tasks"], names):
        task["name"] = name
    with pytest.raises(ConfigError, match=expected):
        load_experiment(raw)


@pytest.mark.parametrize("raw, expected", [
    ({**minimal(), "name": ""}, "name: experiment name '' must name one folder under storage_path"),
    ({**minimal(), "name": "../x"}, "name: experiment name '../x' must name one folder"),
    ({**minimal(), "name": "/abs/run"}, "name: experiment name '/abs/run' must name one folder"),
    ({**minimal(), "name": ".."}, r"name: experiment name '\.\.' must name one folder"),
    ({**minimal(), "name": "a#1"}, r"name: experiment name 'a#1' must name one folder under storage_path, also in a URI"),
    ({**minimal(), "name": "a?x=1"}, r"name: experiment name 'a\?x=1' must name one folder"),
    ({**minimal(), "name": "a%20b"}, r"name: experiment name 'a%20b' must name one folder"),
    (minimal(tasks=[{"name": "color.v2", "train": "c.parquet", "image_column": "image"}]),
     r"tasks\[0\]: task name 'color.v2' may hold only letters, digits, '_' and '-', starting"),
    (minimal(model={"groups": {1: ["color", "style"]}}), r"model.groups.1: keys here are strings, got int 1"),
    (minimal(model={"groups": {"": ["color", "style"]}}), "model.groups: group name '' must be non-empty without '.'"),
    (minimal(model={"groups": {"g.1": ["color"], "g2": ["style"]}}), "model.groups: group name 'g.1' must be non-empty"),
])
def test_names_follow_their_rule(raw: dict, expected: str) -> None:
    """A '.' in a task or group name breaks torch's module keys (and `<task>.<split>` dataset keys) in
    the worker; an empty or path-like experiment name puts the run folder outside its own."""
    with pytest.raises(ConfigError, match=expected):
        load_experiment(raw)
    for name in ("catalogue-v1.2", "demo-20240101-120000", "x", "lr=3e-4,bs=64", "resnet50 baseline"):
        assert load_experiment({**minimal(), "name": name}).name == name
    groups = {"color+pattern": ["color", "style"]}  # what torch takes as a module key
    assert load_experiment(minimal(model={"groups": groups})).model.groups == groups


def test_unknown_kind_suggests_closest() -> None:
    raw = minimal()
    raw["tasks"][1]["kind"] = "multilable"
    with pytest.raises(ConfigError, match=r"tasks\[1\] \('style'\).kind: unknown value 'multilable' \(did you mean 'multilabel'\?\)"):
        load_experiment(raw)


def test_unknown_grad_compression() -> None:
    with pytest.raises(ConfigError, match=r"training.grad_compression: unknown value 'fp8'; choose one of none, bf16"):
        load_experiment(minimal(training={"grad_compression": "fp8"}))


@pytest.mark.parametrize("metric, expected", [
    ("val/colour/accuracy", r"unknown value 'val/colour/accuracy' \(did you mean 'val/color/accuracy'\?\)"),
    ("val/style/accuracy", r"unknown value 'val/style/accuracy'.*\{loss,micro_f1,macro_f1,exact_match\} \(multilabel\)"),
])
def test_checkpoint_metric_is_one_the_epochs_report(metric: str, expected: str) -> None:
    """A metric no epoch reports would rank no checkpoint: the run would keep only the latest."""
    with pytest.raises(ConfigError, match="training.checkpoint_metric: " + expected):
        load_experiment(minimal(training={"checkpoint_metric": metric}))
    for metric in ("val/style/micro_f1", "val/color/macro_f1", "val/mean_score", "train/color/loss_ewma"):
        assert load_experiment(minimal(training={"checkpoint_metric": metric})).training.checkpoint_metric == metric


def test_image_tasks_need_a_view() -> None:
    """No view gives the image backbone nothing to read: it failed building the model in a worker."""
    with pytest.raises(ConfigError, match=r"data.views: empty, but tasks \['color'\] read images"):
        load_experiment(minimal(data={"views": []}))
    text_only = {"name": "exp", "tasks": [minimal()["tasks"][1]], "data": {"views": []}}
    assert load_experiment(text_only).data.views == []
    assert load_experiment(minimal(data={"views": []}, model={"image_backbone": None})).data.views == []


def test_label_smoothing_is_for_multiclass_tasks() -> None:
    """It failed when a worker built the multilabel task's loss."""
    raw = minimal()
    raw["tasks"][1]["label_smoothing"] = 0.1
    with pytest.raises(ConfigError, match=r"tasks\[1\] \('style'\).label_smoothing: applies to multiclass tasks only"):
        load_experiment(raw)


@pytest.mark.parametrize("raw, expected", [
    (minimal(data={"mean": [float("nan"), 0.5, 0.5]}), r"data.mean: every value must be finite, got \[nan, 0.5, 0.5\]"),
    (minimal(data={"mean": [0.5, float("inf"), 0.5]}), r"data.mean: every value must be finite"),
    (minimal(data={"std": [0.2, float("inf"), 0.2]}), r"data.std: every value must be finite and > 0"),
    (minimal(training={"worker_resources": {"GPU": -1}}), r"training.worker_resources.GPU: must be >= 0, got -1.0"),
    (minimal(training={"worker_resources": {"slot": float("nan")}}), r"training.worker_resources.slot: must be >= 0, got nan"),
    (minimal(data={"views": [{"name": "full", "column": ""}]}), r"data.views\[0\].column: a column name cannot be empty"),
])
def test_bad_values_name_their_key(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_experiment(raw)


@pytest.mark.parametrize("key", ["label_column", "image_column", "text_column", "id_column"])
def test_column_names_are_not_empty(key: str) -> None:
    raw = minimal()
    raw["tasks"][0][key] = ""
    with pytest.raises(ConfigError, match=rf"tasks\[0\] \('color'\).{key}: a column name cannot be empty"):
        load_experiment(raw)


def test_task_without_input_column() -> None:
    with pytest.raises(ConfigError, match=r"tasks\[0\] \('a'\): set `image_column` and/or `text_column`"):
        load_experiment({"name": "exp", "tasks": [{"name": "a", "train": "a.csv"}]})


def test_task_in_two_groups() -> None:
    with pytest.raises(ConfigError, match="task 'color' is in two task groups: 'a' and 'b'"):
        load_experiment(minimal(model={"groups": {"a": ["color", "style"], "b": ["color"]}}))


def test_task_in_no_group() -> None:
    with pytest.raises(ConfigError, match=r"tasks \['style'\] are in no task group"):
        load_experiment(minimal(model={"groups": {"a": ["color"]}}))


def test_group_with_unknown_task() -> None:
    with pytest.raises(ConfigError, match="model.groups.a: unknown task 'size'"):
        load_experiment(minimal(model={"groups": {"a": ["color", "style", "size"]}}))


def test_round_trip_through_plain_dict(tmp_path: Path) -> None:
    exp = load_experiment(
        minimal(
            seed=3,
            data={"views": [{"name": "full"}, {"name": "crop", "crop": 0.6}], "tokenizer": "/tok"},
            model={"groups": {"a": ["color"], "b": ["style"]}, "text_config": {"num_hidden_layers": 2}},
            training={"stages": [{"epochs": 1, "freeze": ["image"]}, {"epochs": 2, "lr": 1e-4}], "grad_clip": 1.0},
        )
    )
    again = load_experiment(exp.to_dict())
    assert again == exp
    assert isinstance(again, Experiment)
