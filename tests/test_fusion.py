"""Fusion of image and text: per-modality normalisation, lr multipliers per part, masked modalities.

Plain torch (no Ray): the fused layer's inputs, the optimizer's parameter groups across a resume,
and what a masked modality feeds.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from raymtl.config import ConfigError, DataSpec, ModelSpec, TrainingSpec, ViewSpec, load_experiment
from raymtl.data.synthetic import default_tokenizer_path
from raymtl.models.artifact import META_FILE, WEIGHTS_FILE, load, save_model
from raymtl.models.multitask import Fusion
from raymtl.train.optim import build_lr_schedule, build_optimizer
from test_models import COLOR, TAGS, TITLE, VIEWS, batch, build, loss_of


def fusion_inputs(fusion: Fusion, image, text, rows: int = 4) -> torch.Tensor:
    """What the fused Linear reads: concat of the (normalised) modality slots."""
    seen = []
    handle = fusion.net[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    fusion(image, text, rows=rows)
    handle.remove()
    return seen[0]


def test_layernorm_gives_each_modality_an_equal_share_whatever_its_width_and_scale():
    torch.manual_seed(0)
    fusion = Fusion(256, 768, 32, dropout=0.0, norm="layernorm").eval()
    image = 0.1 * torch.randn(4, 256) + 3.0  # small, offset features
    text = 100.0 * torch.randn(4, 768)  # a wide encoder's huge ones
    x = fusion_inputs(fusion, image, text).detach()
    img, txt = x[:, :256], x[:, 256:]
    total = 256 + 768
    # Each slot: zero mean per row, squared norm D / k = 1024 / 2 (LayerNorm's gain starts at 1).
    for slot in (img, txt):
        assert slot.mean(1).abs().max() < 1e-4
        assert slot.pow(2).sum(1).tolist() == pytest.approx([total / 2] * 4, rel=5e-3)


def test_plain_concatenation_is_the_raw_features():
    fusion = Fusion(8, 16, 4, dropout=0.0, norm="none")
    image, text = torch.randn(3, 8), torch.randn(3, 16)
    assert torch.equal(fusion_inputs(fusion, image, text, 3), torch.cat([image, text], 1))
    assert not any("norm" in name for name, _ in fusion.named_parameters())


def test_a_missing_modality_feeds_zeros_after_the_norm_and_gets_no_gradient():
    model = build({"all": ["color", "title", "tags"]})
    fusion = model.fusion["all"]
    with torch.no_grad():  # a learned bias would otherwise show through a normalised zero slot
        fusion.image_norm.bias.fill_(1.0)
        fusion.text_norm.bias.fill_(1.0)
    text = model.text_encoder(batch(TITLE)["input_ids"], batch(TITLE)["attention_mask"])
    x = fusion_inputs(fusion, None, text)
    assert torch.equal(x[:, : fusion.image_dim], torch.zeros(4, fusion.image_dim))
    loss_of(model, TITLE).backward()
    assert fusion.image_norm.weight.grad is None and fusion.text_norm.weight.grad is not None


def test_modality_dropout_zeros_one_modality_per_dropped_row_in_training_only():
    torch.manual_seed(0)
    fusion = Fusion(8, 16, 4, dropout=0.0, norm="layernorm", modality_dropout=1.0)
    image, text = torch.randn(64, 8), torch.randn(64, 16)
    x = fusion_inputs(fusion.train(), image, text, 64)
    zero_image, zero_text = (x[:, :8] == 0).all(1), (x[:, 8:] == 0).all(1)
    assert torch.equal(zero_image ^ zero_text, torch.ones(64, dtype=torch.bool))  # exactly one per row
    assert 16 < int(zero_image.sum()) < 48  # either modality, about even odds
    x = fusion_inputs(fusion.eval(), image, text, 64)
    assert not (x[:, :8] == 0).all(1).any() and not (x[:, 8:] == 0).all(1).any()


def test_masking_a_modality_is_the_forward_with_zeros_in_its_slot():
    torch.manual_seed(0)
    model = build({"all": ["color", "title", "tags"]}).eval()
    b = batch(TAGS)
    with torch.no_grad():
        image = model.image_backbones["all"](b)
        text = model.text_encoder(b["input_ids"], b["attention_mask"])
        expected = {"text": model.heads["tags"](model.fusion["all"](image, None)),
                    "image": model.heads["tags"](model.fusion["all"](None, text))}
        both = model(b, "tags")
        for masked, logits in expected.items():
            model.mask(masked)
            assert torch.equal(model(b, "tags"), logits)
            assert not torch.equal(logits, both)
            assert model.parameters_for("tags") != []  # the masked encoder is left out of the pass
        model.mask(None)
        assert torch.equal(model(b, "tags"), both)
        model.mask("image")  # an image-only task with its image masked predicts its prior (from zeros)
        assert torch.equal(model({"view_full": torch.randn(2, 3, 32, 32)}, "color"),
                           model({"view_full": torch.zeros(2, 3, 32, 32)}, "color"))
    with pytest.raises(ValueError, match="unknown modality"):
        model.mask("audio")


def test_format_1_model_loads_as_plain_concatenation(tmp_path):
    """A model saved before per-modality norms (no `fusion_norm` in its meta) loads bit-exactly."""
    torch.manual_seed(0)
    old = build({"all": ["color", "title", "tags"]}, fusion_norm="none").eval()
    save_model(tmp_path, old, data=DataSpec(image_size=32, views=[ViewSpec(v) for v in VIEWS]), experiment={})
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["model"]["fusion_norm"]
    meta["format_version"] = 1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    assert not any("norm" in k.split(".")[-2] for k in load_file(tmp_path / WEIGHTS_FILE) if k.startswith("fusion"))
    saved = load(tmp_path)
    assert saved.model.spec.fusion_norm == "none"
    b = batch(TAGS)
    with torch.no_grad():
        assert torch.equal(saved.model(b, "tags"), old(b, "tags"))


# ---------------------------------------------------------------- lr multipliers


def test_lr_multipliers_become_one_parameter_group_per_part():
    model = build({"all": ["color", "title", "tags"]})
    model.freeze(["heads"])
    training = TrainingSpec(lr_multipliers={"text": 0.1, "image": 0.5})
    opt = build_optimizer(model, training, lr=2e-3)
    lrs = {g["part"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"fusion": 2e-3, "image": 1e-3, "text": 2e-4})
    assert opt.param_groups[0]["part"] == "fusion"  # the base lr first: the one a run logs
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for name in ("image", "text", "fusion") for p in model.parts()[name]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter once; frozen heads in none
    # Without multipliers: one group in the model's own order, as checkpoints written before them hold.
    (group,) = build_optimizer(model, TrainingSpec(lr_multipliers={"text": 1.0}), lr=2e-3).param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters() if p.requires_grad]


def test_lr_multipliers_survive_a_resume_bit_exactly():
    """The groups and their (scheduled) lrs come back from the optimizer's state_dict, and the
    resumed optimizer steps exactly as the uninterrupted one."""
    training = TrainingSpec(lr_multipliers={"text": 0.1}, lr_schedule="warmup_cosine", warmup_steps=3)

    def fresh():
        torch.manual_seed(0)
        model = build({"all": ["color", "title", "tags"]}, dropout=0.0)
        opt = build_optimizer(model, training, lr=1e-3)
        return model, opt, build_lr_schedule(opt, training, total_steps=10, step_samples=4)

    def step(model, opt, schedule, task, b=None):
        opt.zero_grad(set_to_none=True)
        b = b or batch(task)
        logits = model(b, task.name)
        loss = torch.nn.functional.cross_entropy(logits, b["label"]) if task.kind == "multiclass" else \
            torch.nn.functional.binary_cross_entropy_with_logits(logits, b["label"])
        loss.backward()
        opt.step()
        schedule.after_step(4)

    model, opt, schedule = fresh()
    for task in (TAGS, TITLE):
        step(model, opt, schedule, task)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), schedule.state_dict()))  # as a file would
    resumed, opt2, schedule2 = fresh()
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    schedule2.load_state_dict(saved[2])
    assert [(g["part"], g["lr"]) for g in opt2.param_groups] == [(g["part"], g["lr"]) for g in opt.param_groups]
    text_lr = next(g["lr"] for g in opt.param_groups if g["part"] == "text")
    assert text_lr == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    last = batch(COLOR)
    step(model, opt, schedule, COLOR, last)
    step(resumed, opt2, schedule2, COLOR, last)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("multipliers, match", [({"txt": 0.1}, "did you mean 'text'"), ({"text": 0}, "must be > 0")])
def test_bad_lr_multipliers_are_config_errors(multipliers, match):
    raw = {"name": "x", "tasks": [{"name": "a", "train": "a.parquet", "image_column": "image"}],
           "training": {"lr_multipliers": multipliers}}
    with pytest.raises(ConfigError, match=match):
        load_experiment(raw)


def test_fusion_norm_is_checked():
    raw = {"name": "x", "tasks": [{"name": "a", "train": "a.parquet", "image_column": "image"}],
           "model": {"fusion_norm": "batchnorm"}}
    with pytest.raises(ConfigError, match="model.fusion_norm"):
        load_experiment(raw)


# ---------------------------------------------------------------- evaluate --modality


@pytest.mark.skipif(default_tokenizer_path() is None, reason="the MiniLM tokenizer is not installed")
def small_image_text(tmp_path, rows: int):
    """A catalogue task's items (image, title, label), its labels, and the data and model specs of a small
    image + text model over them."""
    import pandas as pd

    from raymtl.config import ModelSpec
    from raymtl.data.synthetic import make_catalogue

    items = pd.read_parquet(make_catalogue(tmp_path / "data", seed=0, image_size=16, sizes={"color": rows})["color"]["train"])
    data = DataSpec(image_size=16, views=[ViewSpec("full")], tokenizer=default_tokenizer_path(), max_length=12)
    spec = ModelSpec(image_backbone="resnet18", hidden_dim=8, dropout=0.0,
                     text_config={"vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16})
    return items, sorted(items["label"].unique()), data, spec


def test_evaluation_with_a_masked_modality_reads_nothing_of_it(tmp_path):
    """The scoring stage of `raymtl evaluate --modality image` (text masked) gives the same numbers
    whatever the titles say, `--modality text` whatever the images show; both differ from `both`."""
    from raymtl.config import Experiment, TaskSpec
    from raymtl.data.task_info import TaskInfo
    from raymtl.evaluate import MASKED
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.predict.plan import make_plan
    from test_evaluate import scored

    items, labels, data, spec = small_image_text(tmp_path, 12)
    exp = Experiment("m", [TaskSpec("color", train="x", image_column="image", text_column="title", id_column="id")],
                     data=data, model=spec)
    torch.manual_seed(0)
    model = MultiTaskModel(spec, {"color": TaskInfo("color", "multiclass", labels, 10, 0, True, True)}, ["full"],
                           {"all": ["color"]})
    save_model(tmp_path / "model", model, data=data, experiment=exp.to_dict())
    saved = load(tmp_path / "model")
    other_titles = items.assign(title=items["title"].to_numpy()[::-1])
    other_images = items.assign(image=items["image"].to_numpy()[::-1])

    def probs(modality, rows):
        plan = make_plan(str(tmp_path / "model"), saved, tasks=["color"], label_column="label")
        plan = dataclasses.replace(plan, masked=MASKED[modality])
        return scored(plan, rows)["probs"]

    both = probs("both", items)
    assert np.array_equal(probs("image", items), probs("image", other_titles))
    assert np.array_equal(probs("text", items), probs("text", other_images))
    assert not np.allclose(probs("image", items), both) and not np.allclose(probs("text", items), both)
    assert not np.allclose(probs("both", other_titles), both)  # unmasked, the titles do count

    def bad(modality, rows):
        plan = make_plan(str(tmp_path / "model"), saved, tasks=["color"], label_column="label")
        return scored(dataclasses.replace(plan, masked=MASKED[modality]), rows)["bad"]

    faults = items.assign(title=["", *items["title"][1:]], image=[*items["image"][:-1], str(tmp_path / "gone.png")])
    assert bad("both", faults)[[0, -1]].all() and bad("both", faults).sum() == 2
    assert bad("image", faults).tolist() == [False] * (len(items) - 1) + [True]  # the empty title is masked
    assert bad("text", faults).tolist() == [True] + [False] * (len(items) - 1)  # the missing image is masked


def test_modality_report_lists_each_tasks_primary_metric_per_modality():
    from raymtl.evaluate import Evaluation, modality_table

    def ev(modality, color, season):
        return Evaluation("m", "validation", {"color": {"accuracy": color, "loss": 1.0},
                                              "season": {"accuracy": season, "loss": 1.0}}, modality=modality)

    table = modality_table({"both": ev("both", 0.9, 0.8), "image": ev("image", 0.9, 0.3),
                            "text": ev("text", 0.5, 0.8)}).splitlines()
    assert table[0].split() == ["task", "metric", "both", "image", "text"]
    assert table[2].split() == ["color", "accuracy", "0.9000", "0.9000", "0.5000"]
    assert table[4].split() == ["mean", "score", "0.8500", "0.6000", "0.6500"]


def test_by_default_the_text_encoder_trains_at_a_tenth_of_the_lr():
    """`lr_multipliers` unset: text at DEFAULT_LR_MULTIPLIERS where a text encoder trains; one group
    (the old layout) for an image-only model, a stage with the text frozen, or an explicit {}."""
    model = build({"all": ["color", "title", "tags"]})
    lrs = {g["part"]: g["lr"] for g in build_optimizer(model, TrainingSpec(), lr=1e-3).param_groups}
    assert lrs == pytest.approx({"image": 1e-3, "fusion": 1e-3, "heads": 1e-3, "text": 1e-4})
    assert len(build_optimizer(model, TrainingSpec(lr_multipliers={}), lr=1e-3).param_groups) == 1
    model.freeze(["text"])
    assert len(build_optimizer(model, TrainingSpec(), lr=1e-3).param_groups) == 1
    image_only = build({"all": ["color"]}, tasks=(COLOR,))
    assert image_only.parts()["text"] == []
    assert len(build_optimizer(image_only, TrainingSpec(), lr=1e-3).param_groups) == 1


def test_a_checkpoint_from_before_the_default_resumes_at_one_lr(capsys):
    """Its optimizer state has one group without a part: under the default it resumes in that layout,
    said in one line; a config that sets lr_multipliers gets what it asks (and load_state_dict says
    the layouts differ)."""
    model = build({"all": ["color", "title", "tags"]})
    old = build_optimizer(model, TrainingSpec(lr_multipliers={}), lr=1e-3)
    loss_of(model, COLOR).backward()
    old.step()
    saved = copy.deepcopy(old.state_dict())
    resumed = build_optimizer(model, TrainingSpec(), lr=1e-3, saved=saved)
    resumed.load_state_dict(saved)
    assert len(resumed.param_groups) == 1 and "one lr" in capsys.readouterr().out
    for a, b in zip(old.state.values(), resumed.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    asked = build_optimizer(model, TrainingSpec(lr_multipliers={"text": 0.1}), lr=1e-3, saved=saved)
    with pytest.raises(ValueError, match="parameter groups"):
        asked.load_state_dict(saved)
    new = build_optimizer(model, TrainingSpec(), lr=1e-3)
    again = build_optimizer(model, TrainingSpec(), lr=1e-3, saved=new.state_dict())  # today's layout: kept
    assert [g["part"] for g in again.param_groups] == [g["part"] for g in new.param_groups]


def test_modality_heads_read_each_modality_alone_and_train_only_where_a_task_has_both():
    """`model.modality_loss`: an image + text task gets a head per modality on that modality's
    normalised features; a step's outputs weigh fused : image : text as 1 : w : w over 1 + w, `parameters_for` (what the
    gradient sync moves) lists them, `heads` (what stages freeze) holds them, predictions ignore them."""
    torch.manual_seed(0)
    model = build({"all": ["color", "title", "tags"]}, modality_loss=0.5).eval()  # no dropout between passes
    assert set(model.modality_heads) == {"tags"}  # color is image only, title text only
    b = batch(TAGS)
    outputs = model.training_outputs(b, "tags")
    assert [w for _, w in outputs] == pytest.approx([1 / 1.5, 0.5 / 1.5, 0.5 / 1.5])  # 1 : w : w, each encoder's 1
    fused, image_logits, text_logits = (logits for logits, _ in outputs)
    assert torch.equal(fused, model(b, "tags"))  # the fused head is what forward (prediction) gives
    fusion, heads = model.fusion["all"], model.modality_heads["tags"]
    text = fusion.normalised("text", model.text_encoder(b["input_ids"], b["attention_mask"]))
    assert torch.allclose(text_logits, heads["text"](text))
    image = fusion.normalised("image", model.image_backbones["all"](b))
    assert torch.allclose(image_logits, heads["image"](image))

    sum(F.binary_cross_entropy_with_logits(logits, b["label"]) * w for logits, w in outputs).backward()
    used = {id(p) for p in model.parameters_for("tags")}
    assert all(p.grad is not None and id(p) in used for p in heads.parameters())
    assert {id(p) for p in heads.parameters()} <= {id(p) for p in model.parts()["heads"]}
    assert len(model.training_outputs(batch(COLOR), "color")) == 1  # one modality: the fused head only
    model.mask("text")  # a masked modality: no per-modality loss, nothing to pair it with
    assert len(model.training_outputs(b, "tags")) == 1


def test_modality_loss_is_on_by_default_and_off_builds_the_model_of_format_2():
    assert ModelSpec().modality_loss == 1.0
    torch.manual_seed(0)
    plain = build({"all": ["color", "title", "tags"]}, modality_loss=0.0)
    assert len(plain.modality_heads) == 0 and len(plain.training_outputs(batch(TAGS), "tags")) == 1
    with pytest.raises(ConfigError, match="model.modality_loss: must be >= 0"):
        load_experiment({"name": "x", "tasks": [{"name": "t", "train": "t.parquet", "image_column": "i"}],
                         "model": {"modality_loss": -1}})


def test_a_model_with_modality_heads_saves_and_loads_them(tmp_path):
    torch.manual_seed(0)
    model = build({"all": ["color", "title", "tags"]}, modality_loss=0.5).eval()
    save_model(tmp_path, model, data=DataSpec(image_size=32, views=[ViewSpec(v) for v in VIEWS]), experiment={})
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["format_version"] == 3 and meta["model"]["modality_loss"] == 0.5
    saved = load(tmp_path).model
    b = batch(TAGS)
    with torch.no_grad():
        for (ours, w), (theirs, w2) in zip(model.training_outputs(b, "tags"), saved.training_outputs(b, "tags")):
            assert w == w2 and torch.equal(ours, theirs)


def test_a_masked_modality_is_read_per_task_in_an_evaluation_of_several(tmp_path):
    """Each task's plan numbers its own inputs: the masked ones were taken from the first task's plan,
    so under --modality text an image-only task first made a text-only task's empty titles count."""
    import pandas as pd

    from raymtl.config import Experiment, TaskSpec
    from raymtl.data.task_info import TaskInfo
    from raymtl.evaluate import MASKED, _PrepareEach, _ScoreEach, by_task, tagged
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.predict.plan import make_plan

    items, labels, data, spec = small_image_text(tmp_path, 6)
    tasks = [TaskSpec("color", train="x", image_column="image", id_column="id"),
             TaskSpec("words", train="x", text_column="title", id_column="id")]
    infos = {"color": TaskInfo("color", "multiclass", labels, 6, 0, True, False),
             "words": TaskInfo("words", "multiclass", labels, 6, 0, False, True)}
    save_model(tmp_path / "model", MultiTaskModel(spec, infos, ["full"], {"all": ["color", "words"]}), data=data,
               experiment=Experiment("m", tasks, data=data, model=spec).to_dict())
    saved = load(tmp_path / "model")
    faults = items.assign(title=["", *items["title"][1:]], image=[str(tmp_path / "gone.png"), *items["image"][1:]])

    def bad(modality):
        plans = [dataclasses.replace(make_plan(str(tmp_path / "model"), saved, tasks=[t], label_column="label"),
                                     masked=MASKED[modality]) for t in ("color", "words")]
        stream = pd.concat([tagged(faults, 0), tagged(faults, 1)], ignore_index=True)
        scored = by_task(_ScoreEach(plans, use_gpu=False)(_PrepareEach(plans)(stream)))
        return [scored[k]["bad"][0] for k in (0, 1)]  # row 0: no image, empty title

    assert bad("both") == [True, True]
    assert bad("text") == [False, True]  # the image masked: color's missing image spoils nothing
    assert bad("image") == [True, False]


def test_evaluation_scores_an_empty_text_as_training_does_and_prediction_flags_it(tmp_path):
    """Evaluate left such rows out while training's validation tokenized them as "": other numbers."""
    from raymtl.config import Experiment, TaskSpec
    from raymtl.data.task_info import TaskInfo
    from raymtl.evaluate import _plan
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.predict.plan import make_plan
    from test_evaluate import scored

    items, labels, data, spec = small_image_text(tmp_path, 6)
    task = TaskSpec("color", train="x", image_column="image", text_column="title", id_column="id")
    model = MultiTaskModel(spec, {"color": TaskInfo("color", "multiclass", labels, 6, 0, True, True)}, ["full"],
                           {"all": ["color"]})
    save_model(tmp_path / "model", model, data=data, experiment=Experiment("m", [task], data=data, model=spec).to_dict())
    saved, path = load(tmp_path / "model"), str(tmp_path / "model")
    empty = items.assign(title=["  ", *items["title"][1:]])
    assert not scored(_plan(path, saved, task, "both"), empty)["bad"].any()
    assert scored(make_plan(path, saved, tasks=["color"], label_column="label"), empty)["bad"].tolist() == \
        [True] + [False] * (len(items) - 1)
