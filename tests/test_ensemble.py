"""Ensembles in plain torch: grow a saved model, compose from parts, freeze, save -> load -> predict."""

from __future__ import annotations

import dataclasses
import re
import tempfile

import pytest
import torch
from torchvision import models

from raymtl import storage
from raymtl.config import ConfigError, DataSpec, Experiment, ModelSpec, StageSpec, TaskSpec, ViewSpec
from raymtl.data.task_info import TaskInfo
from raymtl.models.artifact import load, save_model
from raymtl.models.build import build_model
from raymtl.train.optim import build_optimizer

VIEWS = [ViewSpec("full"), ViewSpec("crop", crop=0.5)]
TEXT = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16}


def info(name, labels=("a", "b", "c"), kind="multiclass"):
    return TaskInfo(name, kind, list(labels), n_train=64, n_val=16, has_image=True, has_text=True)


def experiment(tasks, groups=None, **model):
    spec = ModelSpec(image_backbone="resnet18", text_config=TEXT, hidden_dim=16, dropout=0.0, groups=groups, **model)
    return Experiment(
        name="t",
        tasks=[TaskSpec(name=t, train="unused.parquet", image_column="image", text_column="title") for t in tasks],
        data=DataSpec(image_size=16, views=VIEWS, tokenizer=None),
        model=spec,
    )


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "view_full": torch.randn(n, 3, 16, 16, generator=g),
        "view_crop": torch.randn(n, 3, 16, 16, generator=g),
        "input_ids": torch.randint(0, 50, (n, 8), generator=g),
        "attention_mask": torch.ones(n, 8, dtype=torch.long),
        "label": torch.randint(0, 3, (n,), generator=g),
    }


def save(model, exp, path):
    return save_model(path, model, data=exp.data, experiment=exp.to_dict())


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_load_predict_gives_identical_outputs(tmp_path):
    exp = experiment(["color", "season"], groups={"visual": ["color"], "other": ["season"]})
    model = build_model(exp, {"color": info("color"), "season": info("season", ("w", "s"))}).eval()
    saved = load(save(model, exp, tmp_path / "m"))
    assert saved.groups == {"visual": ["color"], "other": ["season"]}
    assert saved.infos["season"].labels == ["w", "s"]
    b = batch()
    for task in ("color", "season"):
        assert torch.equal(model(b, task), saved.model(b, task))


def test_a_uri_loads_into_a_folder_of_its_own_removed_after_and_map_location_moves_the_weights(
    tmp_path, monkeypatch
):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    copies = []
    real_download = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda src, local: copies.append(local) or real_download(src, local))
    exp = experiment(["color"])
    model = build_model(exp, {"color": info("color")}).eval()
    uri = save(model, exp, tmp_path / "m").resolve().as_uri()  # file://...: copied as s3:// would be
    first, second = load(uri), load(uri)
    assert len(set(copies)) == 2  # no shared folder
    assert list((tmp_path / "tmp").iterdir()) == []  # both copies removed once loaded
    b = batch()
    assert torch.equal(first.model(b, "color"), model(b, "color"))
    assert torch.equal(second.model(b, "color"), model(b, "color"))
    assert {p.device.type for p in load(tmp_path / "m", map_location="meta").model.parameters()} == {"meta"}


def test_growing_a_saved_model_keeps_its_tasks_and_adds_heads(tmp_path):
    base_exp = experiment(["color"])
    base = build_model(base_exp, {"color": info("color")})
    path = save(base, base_exp, tmp_path / "base")
    grown_exp = experiment(["pattern"], groups={"all": ["pattern"]}, base=str(path))
    grown = build_model(grown_exp, {"pattern": info("pattern", ("solid", "striped"))})
    assert set(grown.infos) == {"color", "pattern"}
    assert grown.heads["pattern"].out_features == 2
    assert_same(state(grown.heads["color"]), state(base.heads["color"]))
    assert_same(state(grown.image_backbones["all"]), state(base.image_backbones["all"]))
    # a new group gets its own backbone; the old one stays as trained
    apart = build_model(experiment(["pattern"], groups={"new": ["pattern"]}, base=str(path)),
                        {"pattern": info("pattern", ("solid", "striped"))})
    assert set(apart.image_backbones) == {"all", "new"}


def test_a_grown_model_saves_the_bases_architecture_not_its_configs(tmp_path):
    """A config that names only the base and the new task leaves hidden_dim and text_pooling at their defaults."""
    base_exp = experiment(["color"], text_pooling="cls")
    base_exp = dataclasses.replace(base_exp, model=dataclasses.replace(base_exp.model, hidden_dim=32))
    path = save(build_model(base_exp, {"color": info("color")}), base_exp, tmp_path / "base")
    grown_exp = experiment(["pattern"], groups={"all": ["pattern"]}, base=str(path))
    grown = build_model(grown_exp, {"pattern": info("pattern", ("solid", "striped"))}).eval()
    loaded = load(save(grown, grown_exp, tmp_path / "grown")).model
    assert (loaded.spec.hidden_dim, loaded.spec.text_pooling) == (32, "cls")
    b = batch()
    for task in ("color", "pattern"):
        assert torch.equal(loaded(b, task), grown(b, task))


def test_a_grown_model_trains_with_the_configs_dropout_and_a_new_group_starts_from_its_weights(tmp_path):
    base_exp = experiment(["color"])
    base = build_model(base_exp, {"color": info("color")})
    path = save(base, base_exp, tmp_path / "base")
    torch.manual_seed(123)
    weights = models.resnet18().state_dict()
    torch.save(weights, tmp_path / "w.pth")
    exp = experiment(["pattern"], groups={"new": ["pattern"]}, base=str(path), image_weights=str(tmp_path / "w.pth"),
                     modality_dropout=0.2)
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, dropout=0.3))
    grown = build_model(exp, {"pattern": info("pattern")})
    trunk = grown.image_backbones["new"].trunk.state_dict()
    assert trunk and all(torch.equal(v, weights[k]) for k, v in trunk.items())
    assert_same(state(grown.image_backbones["all"]), state(base.image_backbones["all"]))  # as trained
    layers = [*(b.fuse for b in grown.image_backbones.values()), *(f.net for f in grown.fusion.values())]
    assert {m.p for seq in layers for m in seq if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert {f.modality_dropout for f in grown.fusion.values()} == {0.2}


def test_a_grown_model_takes_the_configs_threshold_and_weight_for_the_bases_tasks(tmp_path):
    tags = info("tags", kind="multilabel")
    base_exp = experiment(["tags"])
    path = save(build_model(base_exp, {"tags": tags}), base_exp, tmp_path / "base")
    grown_exp = experiment(["tags", "pattern"], base=str(path))
    again = dataclasses.replace(tags, threshold=0.3, weight=2.0)  # as inspection builds it from the config
    saved = load(save(build_model(grown_exp, {"tags": again, "pattern": info("pattern")}), grown_exp, tmp_path / "g"))
    assert (saved.thresholds["tags"], saved.infos["tags"].weight) == (0.3, 2.0)  # as the run validated it
    image_only = {"tags": dataclasses.replace(tags, has_text=False)}
    path = save(build_model(base_exp, image_only), base_exp, tmp_path / "image")
    with pytest.raises(ConfigError, match=r"task 'tags': the base model's head is multilabel on image; this config "
                                          r"makes it multilabel on image \+ text"):
        build_model(experiment(["tags"], base=str(path)), {"tags": tags})  # its head would never read the text


def test_compose_from_parts_loads_each_parts_backbone_exactly(tmp_path):
    parts = {}
    for seed, (task, group) in enumerate([("color", "cp"), ("sleeve", "sl")]):
        exp = dataclasses.replace(experiment([task]), seed=seed + 10)
        model = build_model(exp, {task: info(task)})
        parts[group] = (model, save(model, exp, tmp_path / group))
    ens_exp = experiment(
        ["color", "sleeve"],
        groups={"cp": ["color"], "sl": ["sleeve"]},
        init_from={"cp": str(parts["cp"][1]), "sl": str(parts["sl"][1]), "text": str(parts["cp"][1])},
    )
    ensemble = build_model(ens_exp, {"color": info("color"), "sleeve": info("sleeve")})
    for group, (model, _) in parts.items():
        assert_same(state(ensemble.image_backbones[group]), state(model.image_backbones["all"]))
    assert_same(state(ensemble.text_encoder), state(parts["cp"][0].text_encoder))
    # heads start fresh unless asked for
    assert not torch.equal(ensemble.heads["color"].weight, parts["cp"][0].heads["color"].weight)


@pytest.mark.parametrize("data, match", [
    ({"views": VIEWS[::-1]}, r"data.views is \['crop \(crop 0.5\)', 'full'\] here but \['full', 'crop \(crop 0.5\)'\]"),
    ({"views": [VIEWS[0], ViewSpec("crop", crop=0.8)]}, r"data.views is \['full', 'crop \(crop 0.8\)'\] here"),
    ({"image_size": 32}, "data.image_size is 32 here but 16 in that model"),
    ({"mean": [0.5] * 3, "std": [0.5] * 3}, r"data.mean / std is \[\[0.5, 0.5, 0.5\], \[0.5, 0.5, 0.5\]\] here"),
])
def test_a_saved_backbone_is_taken_only_for_the_images_it_was_trained_on(tmp_path, data, match):
    """Its fuse layer's weights are per view: views swapped with equal shapes would load and read the wrong ones."""
    src_exp = experiment(["color"])
    path = str(save(build_model(src_exp, {"color": info("color")}), src_exp, tmp_path / "src"))
    for model, what in (({"init_from": {"all": path}}, "model.init_from.all"), ({"base": path}, "model.base")):
        exp = experiment(["color"], **model)
        exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, **data))
        with pytest.raises(ConfigError, match=re.escape(f"{what} ({path}): ") + match):
            build_model(exp, {"color": info("color")})


def test_compose_names_a_group_that_does_not_exist(tmp_path):
    exp = experiment(["color"])
    path = save(build_model(exp, {"color": info("color")}), exp, tmp_path / "m")
    with pytest.raises(ConfigError, match="'nope' is no task group"):
        build_model(experiment(["color"], init_from={"nope": str(path)}), {"color": info("color")})


def test_frozen_parts_stay_bit_identical_through_training_steps():
    exp = experiment(["color", "season"], groups={"visual": ["color"], "other": ["season"]})
    model = build_model(exp, {"color": info("color"), "season": info("season")}).train()
    stage = StageSpec(epochs=1, freeze=["image", "text"])
    model.freeze(stage.freeze)
    frozen = {"image": state(model.image_backbones), "text": state(model.text_encoder)}  # BN stats too
    heads = state(model.heads)
    opt = build_optimizer(model, exp.training, lr=0.1)
    for step in range(4):
        task = ("color", "season")[step % 2]
        b = batch(seed=step)
        loss = torch.nn.functional.cross_entropy(model(b, task), b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_same(state(model.image_backbones), frozen["image"])
    assert_same(state(model.text_encoder), frozen["text"])
    assert not torch.equal(state(model.heads)["color.weight"], heads["color.weight"])
    model.freeze([])  # the next stage fine-tunes everything
    assert all(p.requires_grad for p in model.parameters())
    assert model.image_backbones.training


def test_init_heads_takes_the_fusion_and_heads_that_fit_and_says_which_it_left(tmp_path, caplog):
    """An image-only part in an image+text ensemble: its fusion layer has other shapes (no text input),
    its head fits. `init_heads` takes what fits, as documented, rather than failing the composition."""
    src_exp = dataclasses.replace(experiment(["color"]), model=ModelSpec(image_backbone="resnet18", hidden_dim=16,
                                                                         dropout=0.0))
    source = build_model(src_exp, {"color": info("color")})
    path = str(save(source, src_exp, tmp_path / "image-only"))
    with caplog.at_level("INFO", logger="raymtl"):
        ensemble = build_model(experiment(["color"], init_from={"all": path}, init_heads=True), {"color": info("color")})
    assert_same(state(ensemble.image_backbones["all"]), state(source.image_backbones["all"]))
    assert_same(state(ensemble.heads["color"]), state(source.heads["color"]))
    assert f"model.init_from.all: fusion 'all' of {path} not taken: its shapes differ (text_norm.weight: (16,) here, " \
           "absent there)" in caplog.text


def test_a_backbone_of_another_shape_fails_naming_the_first_weight_that_differs(tmp_path):
    src_exp = experiment(["color"])
    path = str(save(build_model(src_exp, {"color": info("color")}), src_exp, tmp_path / "r18"))
    exp = experiment(["color"], init_from={"all": path})
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, image_backbone="resnet34"))
    with pytest.raises(ConfigError, match=re.escape(f"cannot load the image backbone 'all' of {path}: its shapes "
                                                    "differ (trunk.layer1.2.conv1.weight: (64, 64, 3, 3) here, absent there)")):
        build_model(exp, {"color": info("color")})
