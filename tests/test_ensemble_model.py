"""Ensembles as one saved model: averaged probabilities, checked members, prediction's model stage.

Members are tiny untrained planted-task models (built, not fitted), so the test needs no Ray.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

import raymtl
from ops import Ops
from raymtl.cli import main
from raymtl.config import ConfigError, DataSpec, Experiment, ModelSpec, TaskSpec, ViewSpec
from raymtl.data.planted import make_planted
from raymtl.data.synthetic import default_tokenizer_path
from raymtl.data.task_info import TaskInfo
from raymtl.data.device_inputs import DeviceInputs
from raymtl.data.transforms import Preprocessor
from raymtl.models.artifact import META_FILE, save_model
from raymtl.models.ensemble import EnsembleModel, build_ensemble
from raymtl.models.multitask import MultiTaskModel
from raymtl.predict.actors import Predict, Prepare
from raymtl.predict.plan import make_plan

TASKS = ("a", "b")
TOKENIZER = default_tokenizer_path()  # a real tokenizer folder, for members that read text


def save_tiny(folder, seed: int, groups: dict, labels: dict | None = None, image_size: int = 16) -> str:
    """A saved untrained image model over TASKS (binary labels unless `labels` says otherwise)."""
    labels = labels or {}
    tasks = [TaskSpec(t, train="unused.parquet", image_column="image", id_column="id") for t in TASKS]
    exp = Experiment("tiny", tasks, data=DataSpec(image_size=image_size, views=[ViewSpec("full")]),
                     model=ModelSpec(image_backbone="resnet18", hidden_dim=8, dropout=0.0, groups=groups))
    infos = {t: TaskInfo(t, "multiclass", labels.get(t, ["0", "1"]), 10, 0, True, False) for t in TASKS}
    torch.manual_seed(seed)
    model = MultiTaskModel(exp.model, infos, ["full"], groups)
    save_model(folder, model, data=exp.data, experiment=exp.to_dict())
    return str(folder)


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("members")
    return [save_tiny(root / "shared", 0, {"all": list(TASKS)}),
            save_tiny(root / "split", 1, {"ga": ["a"], "gb": ["b"]})]


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> pd.DataFrame:
    catalogue = make_planted(tmp_path_factory.mktemp("items"), n_clusters=1, tasks_per_cluster=1, n_per_task=12)
    return pd.read_parquet(next(iter(catalogue.values()))["train"])


def member_probs(folder: str, items: pd.DataFrame) -> dict[str, np.ndarray]:
    saved = raymtl.load(folder)
    probs = {}
    for task, info in saved.infos.items():
        arrays = Preprocessor(TaskSpec(task, train=None, image_column="image"), info, saved.data, with_labels=False)(items)
        with torch.no_grad():
            probs[task] = saved.model(DeviceInputs(saved.data, "cpu")({"view_full": arrays["view_full"]}), task).softmax(1).numpy()
    return probs


@pytest.mark.parametrize("weights", [None, [3.0, 1.0]])
def test_ensemble_forward_is_the_weighted_mean_of_member_probabilities(members, items, tmp_path, weights):
    out = build_ensemble(members, str(tmp_path / "ens"), weights)
    saved = raymtl.load(out)
    assert isinstance(saved.model, EnsembleModel) and saved.tasks == list(TASKS)
    w = np.array(weights or [1.0, 1.0]) / sum(weights or [1.0, 1.0])
    expected = [member_probs(m, items) for m in members]
    got = member_probs(out, items)
    for task in TASKS:
        mean = w[0] * expected[0][task] + w[1] * expected[1][task]
        assert not np.allclose(expected[0][task], expected[1][task], atol=1e-3)  # the members disagree
        np.testing.assert_allclose(got[task], mean, atol=1e-5)


def test_prediction_stage_averages_members_in_one_actor(members, items, tmp_path):
    out = build_ensemble(members, str(tmp_path / "ens"))
    plan = make_plan(out, raymtl.load(out))
    predictor, batch = Predict(plan, use_gpu=False), Prepare(plan)(items)
    with Ops() as ops:  # on a GPU each value read back (an ensemble weight, say) waits for the device
        rows = predictor(batch).to_pandas()
    assert ops.host_reads == 0
    expected = [member_probs(m, items) for m in members]
    for task in TASKS:
        mean = (expected[0][task] + expected[1][task]) / 2
        best = mean.argmax(1)
        assert list(rows[task]) == [["0", "1"][b] for b in best]
        np.testing.assert_allclose(rows[f"{task}_prob"], mean[np.arange(len(best)), best], atol=1e-5)


def test_the_folder_copies_its_members(members, tmp_path):
    out = tmp_path / "ens"
    assert main(["ensemble", *members, "--out", str(out), "--weights", "1", "1"]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["ensemble"]["weights"] == [0.5, 0.5]
    for path in meta["ensemble"]["members"]:
        assert (out / path / META_FILE).is_file() and (out / path / "model.safetensors").is_file()


def test_members_with_another_label_map_are_refused_naming_the_task(members, tmp_path):
    other = save_tiny(tmp_path / "other", 2, {"all": list(TASKS)}, labels={"b": ["0", "1", "2"]})
    with pytest.raises(ConfigError, match=r"task 'b'.*labels"):
        build_ensemble([members[0], other], str(tmp_path / "ens"))
    assert not (tmp_path / "ens").exists()


def test_members_with_other_preprocessing_or_weights_are_refused(members, tmp_path, capsys):
    bigger = save_tiny(tmp_path / "bigger", 2, {"all": list(TASKS)}, image_size=32)
    with pytest.raises(ConfigError, match="preprocesses inputs differently"):
        build_ensemble([members[0], bigger], str(tmp_path / "ens"))
    assert main(["ensemble", *members, "--out", str(tmp_path / "e2"), "--weights", "1"]) == 2
    assert "1 ensemble weights for 2 members" in capsys.readouterr().err


def test_members_that_differ_only_in_grouping_order_build_one_ensemble(members, items, tmp_path):
    rev = save_tiny(tmp_path / "rev", 2, {"gb": ["b"], "ga": ["a"]})
    assert list(raymtl.load(rev).infos) == ["b", "a"]  # saved in the grouping's order, unlike the others
    folders = [rev, *members]
    out = build_ensemble(folders, str(tmp_path / "ens"))
    expected = [member_probs(m, items) for m in folders]
    means = {task: sum(e[task] for e in expected) / len(folders) for task in TASKS}
    got = member_probs(out, items)
    plan = make_plan(out, raymtl.load(out))
    rows = Predict(plan, use_gpu=False)(Prepare(plan)(items)).to_pandas()
    for task in TASKS:
        np.testing.assert_allclose(got[task], means[task], atol=1e-5)
        np.testing.assert_allclose(rows[f"{task}_prob"], means[task].max(1), atol=1e-5)


def save_text(folder, seed: int, tokenizer: str) -> str:
    """A saved untrained text-only model over TASKS that tokenizes with `tokenizer`."""
    tasks = [TaskSpec(t, train="unused.parquet", text_column="title") for t in TASKS]
    text = {"model_type": "bert", "vocab_size": 64, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}
    exp = Experiment("tiny", tasks, data=DataSpec(tokenizer=tokenizer, max_length=16),
                     model=ModelSpec(image_backbone=None, text_config=text, hidden_dim=8, dropout=0.0))
    infos = {t: TaskInfo(t, "multiclass", ["0", "1"], 10, 0, False, True) for t in TASKS}
    torch.manual_seed(seed)
    model = MultiTaskModel(exp.model, infos, ["full"], {"all": list(TASKS)})
    save_model(folder, model, data=exp.data, experiment=exp.to_dict())
    return str(folder)


@pytest.mark.skipif(TOKENIZER is None, reason="needs the MiniLM tokenizer package")
def test_members_with_another_tokenizer_are_refused_naming_both(tmp_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(TOKENIZER, do_lower_case=False).save_pretrained(tmp_path / "cased")
    uncased, same = save_text(tmp_path / "uncased", 0, TOKENIZER), save_text(tmp_path / "same", 1, TOKENIZER)
    cased = save_text(tmp_path / "cased_model", 2, str(tmp_path / "cased"))
    refusal = rf"member {re.escape(cased)} tokenizes text differently from member {re.escape(uncased)} \(tokenizer"
    with pytest.raises(ConfigError, match=refusal):
        build_ensemble([uncased, cased], str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    out = build_ensemble([uncased, same], str(tmp_path / "ens"))  # the same tokenizer: one ensemble
    assert isinstance(raymtl.load(out).model, EnsembleModel)
