"""Octopod's staged recipe: its single-modality parts, the composed model, the sweep axis, and the
config in jobs/configs trained end to end on a tiny catalogue."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from raymtl.config import ConfigError, StageSpec, load_experiment
from raymtl.data.synthetic import default_tokenizer_path, make_catalogue
from raymtl.models.artifact import load
from raymtl.train.recipes import compose, fit_recipe, part_experiment, train_parts
from raymtl.tune.spec import apply_config, load_sweep

CONFIG = Path(__file__).parent.parent / "jobs" / "configs" / "staged_image_text.yaml"


def test_parts_are_single_modality_models_of_the_same_tasks():
    exp = load_experiment(CONFIG)
    image, text = part_experiment(exp, "image"), part_experiment(exp, "text")
    assert (image.name, text.name) == ("catalogue-staged-image", "catalogue-staged-text")
    assert [t.name for t in image.tasks] == [t.name for t in text.tasks] == exp.task_names
    assert all(t.text_column is None for t in image.tasks) and image.model.text_encoder is None
    assert all(t.image_column is None for t in text.tasks) and text.model.image_backbone is None
    assert image.training.recipe == text.training.recipe == "joint"
    assert image.training.epochs == exp.training.epochs and image.training.lr_multipliers == {"text": 0.1}


@pytest.mark.parametrize("metric, mode, image_part", [
    ("val/season/accuracy", "max", "val/mean_score"), ("val/season/loss", "min", "val/mean_loss"),
    ("train/season/loss_ewma", "min", "train/mean_loss_ewma"), ("val/color/accuracy", "max", "val/color/accuracy")])
def test_a_part_ranks_by_a_metric_it_reports(metric, mode, image_part):
    """A task the image part lacks (text only) cannot rank its checkpoints: the part takes its mean of
    the same sense; the text part, which has every task, keeps the run's metric."""
    exp = load_experiment(CONFIG)
    season = next(t for t in exp.tasks if t.name == "season")
    tasks = [dataclasses.replace(t, image_column=None) if t is season else t for t in exp.tasks]
    exp = dataclasses.replace(exp, tasks=tasks, training=dataclasses.replace(
        exp.training, checkpoint_metric=metric, checkpoint_mode=mode)).validate()
    assert part_experiment(exp, "image").training.checkpoint_metric == image_part
    assert part_experiment(exp, "text").training.checkpoint_metric == metric


def test_composed_model_takes_its_backbones_from_the_parts_and_trains_the_fusion_stages():
    exp = load_experiment(CONFIG)
    composed = compose(exp, "runs/image/ckpt", "runs/text/ckpt")
    assert composed.model.init_from == {"all": "runs/image/ckpt", "text": "runs/text/ckpt"}
    assert composed.training.stages == exp.training.fusion_stages and composed.training.recipe == "joint"
    default = compose(dataclasses.replace(exp, training=dataclasses.replace(exp.training, fusion_stages=[]),
                                          model=dataclasses.replace(exp.model, modality_loss=0.5)), "i", "t")
    assert exp.training.epochs > 1  # default: one epoch on the frozen parts, then everything trains
    assert default.training.stages == [StageSpec(epochs=1, freeze=["image", "text"]),
                                       StageSpec(epochs=exp.training.epochs - 1)]
    assert default.model.modality_loss == 0.5  # the fine-tune keeps the per-modality heads
    one = dataclasses.replace(exp.training, epochs=1, fusion_stages=[])
    assert compose(dataclasses.replace(exp, training=one), "i", "t").training.stages == [
        StageSpec(epochs=1, freeze=["image", "text"])]
    with_aux = dataclasses.replace(exp, model=dataclasses.replace(exp.model, modality_loss=1.0))
    assert compose(with_aux, "i", "t").model.modality_loss == 1.0  # the config's second stage fine-tunes all

    def stages(*frozen):
        return dataclasses.replace(with_aux, training=dataclasses.replace(
            exp.training, fusion_stages=[StageSpec(epochs=1, freeze=f) for f in frozen]))

    assert compose(stages(["image", "text"], ["text"]), "i", "t").model.modality_loss == 1.0  # image trains
    # on frozen parts only: the parts already trained each modality alone
    assert compose(stages(["image", "text"], ["text", "image"]), "i", "t").model.modality_loss == 0.0


def test_parts_named_in_init_from_are_not_trained_again():
    exp = load_experiment(CONFIG)
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, init_from={"text": "trained/text"}))
    trained = []

    def fit(e):
        trained.append(e.name)
        return type("R", (), {"best_checkpoint": f"ckpt/{e.name}", "checkpoint": None})()

    composed = train_parts(exp, fit)
    assert trained == ["catalogue-staged-image"]
    assert composed.model.init_from == {"text": "trained/text", "all": "ckpt/catalogue-staged-image"}


def test_staged_needs_both_modalities():
    exp = load_experiment(CONFIG)
    image_only = dataclasses.replace(exp, model=dataclasses.replace(exp.model, text_encoder=None))
    with pytest.raises(ConfigError, match="staged composes an image model and a text model"):
        train_parts(image_only, fit=None)


def test_sweep_compares_joint_and_staged():
    exp, spec = load_sweep(CONFIG)
    assert spec.recipes == ["joint", "staged"]
    assert [apply_config(exp, {"recipe": r}).training.recipe for r in spec.recipes] == ["joint", "staged"]
    with pytest.raises(ConfigError, match="training.recipe"):
        apply_config(exp, {"recipe": "sequential"}).validate()


def test_a_one_worker_trial_trains_its_parts_in_its_own_process_and_tells_tune_nothing(monkeypatch, tmp_path):
    """In a Tune trial's actor `fit` would start a Train run for each part (the actor joined the
    cluster), waiting for the GPU share the trial itself holds; a one-worker trial trains them as it
    trains itself, in its process, and their reports do not reach Tune. A trial of several workers
    (a Train run itself) keeps `fit`."""
    import ray.train
    from ray import tune
    from ray.tune.trainable import trainable_fn_utils

    from raymtl.train import trainer
    from raymtl.tune.sweep import part_fit

    staged = load_experiment(CONFIG)
    one = dataclasses.replace(staged.training, num_workers=1)
    exp = dataclasses.replace(staged, storage_path=str(tmp_path), training=one)
    calls, trained, tuned = [], [], []
    monkeypatch.setattr(ray.train, "report", lambda metrics, *a, **k: trained.append(metrics))
    monkeypatch.setattr(tune, "report", lambda metrics, *a, **k: tuned.append(metrics))

    def fit(part, **kwargs):
        calls.append((part.name, kwargs, trainable_fn_utils._in_tune_session()))
        ray.train.report({"val/loss": 1.0})
        return "trained"

    monkeypatch.setattr(trainer, "fit", fit)
    assert part_fit(exp)(part_experiment(exp, "image")) == "trained"
    assert calls == [("catalogue-staged-image", {"here": True}, False)]  # in this process, Train's API allowed
    assert trained == [{"val/loss": 1.0}] and tuned == []
    several = dataclasses.replace(exp, training=dataclasses.replace(exp.training, num_workers=2))
    assert part_fit(several) is fit


@pytest.mark.slow
@pytest.mark.skipif(default_tokenizer_path() is None, reason="the MiniLM tokenizer is not installed")
def test_staged_config_trains_end_to_end(tmp_path):
    """The job config on a tiny catalogue: image and text parts, then fusion on frozen parts (the
    backbones stay bit-identical to the parts'), then everything (the backbones move)."""
    exp = load_experiment(CONFIG)
    catalogue = make_catalogue(tmp_path / "data", seed=0, image_size=16, sizes={"color": 40, "season": 40})
    tasks = [dataclasses.replace(exp.task(name), train=paths["train"], validation=paths["val"])
             for name, paths in catalogue.items()]
    tokenizer = default_tokenizer_path()
    bert = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}
    tr = exp.training
    exp = dataclasses.replace(
        exp, storage_path=str(tmp_path / "runs"), tasks=tasks,
        data=dataclasses.replace(exp.data, image_size=16, tokenizer=tokenizer, max_length=16),
        model=dataclasses.replace(exp.model, image_backbone="resnet18", text_encoder=None, text_config=bert,
                                  hidden_dim=16),
        training=dataclasses.replace(
            tr, epochs=1, batch_size=16, warmup_steps=1, num_workers=1, use_gpu=False, cpus_per_worker=1,
            in_process="always", max_failures=0, keep_checkpoints=3,
            fusion_stages=[dataclasses.replace(s, epochs=1) for s in tr.fusion_stages]),
    ).validate()
    from raymtl.train.trainer import fit

    result = fit_recipe(exp, fit)
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["catalogue-staged", "catalogue-staged-image",
                                                     "catalogue-staged-text"]
    assert [row["epoch"] for row in result.history] == [1, 2]  # two fusion stages of one epoch
    assert all(f"val/{t}/accuracy" in result.history[-1] for t in ("color", "season"))
    image = load(_newest(runs / "catalogue-staged-image")).model
    text = load(_newest(runs / "catalogue-staged-text")).model
    after_frozen, final = (load(p).model for p in _checkpoints(runs / "catalogue-staged")[-2:])
    for model, same in ((after_frozen, True), (final, False)):
        assert _equal(model.image_backbones["all"], image.image_backbones["all"]) is same
        assert _equal(model.text_encoder, text.text_encoder) is same


def _checkpoints(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint_*"))


def _newest(run: Path) -> Path:
    return _checkpoints(run)[-1]


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_badly_named_task_is_refused_before_a_part_trains():
    """Each part checked only its own tasks: a text task named `keys` was found after the image part trained."""
    exp = load_experiment(CONFIG)
    text_only = dataclasses.replace(exp.tasks[-1], name="keys", image_column=None)  # in the text part only
    exp = dataclasses.replace(exp, tasks=[*exp.tasks[:-1], text_only]).validate()
    with pytest.raises(ConfigError, match=r"task name\(s\) \['keys'\]"):
        fit_recipe(exp, fit=lambda part: pytest.fail(f"{part.name} trained"))
