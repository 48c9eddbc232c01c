"""Octopod's staged recipe (`training.recipe: staged`): single-modality models first, then fusion.

1. an image model (the config's tasks that have images, no text encoder) and a text model (the
   tasks that have text, no image backbone) train as the config's `training` section says (but for
   a `checkpoint_metric` of a task the part lacks: the part's mean of the same sense), each under
   its own run name (`<name>-image`, `<name>-text`; a rerun resumes them like any run);
2. the image + text model of the config is composed from their best checkpoints (`model.init_from`:
   each task group's image backbone from the image model, the text encoder from the text model)
   and trained in `training.fusion_stages`: a stage with both backbones frozen trains only the
   fusion layers and heads; a stage without `freeze` fine-tunes all (with the per-modality heads of
   `model.modality_loss`, as a joint run has them). By default (`default_fusion_stages`) one epoch
   of the first, then the rest of `training.epochs` of the second.

Parts the config's own `model.init_from` already names (trained elsewhere) are not trained again.
`joint` (the default) trains the image + text model from the start in one run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from raymtl.config import ConfigError, Experiment, StageSpec, TrainingSpec, metric_task
from raymtl.train.trainer import TrainResult

Fit = Callable[[Experiment], TrainResult]


def has_image(exp: Experiment, task) -> bool:
    return task.image_column is not None or any(v.column for v in exp.data.views)


def part_experiment(exp: Experiment, modality: str) -> Experiment:
    """The single-modality model of `exp` that the staged recipe trains first (image or text)."""
    if modality == "image":
        tasks = [dataclasses.replace(t, text_column=None) for t in exp.tasks if has_image(exp, t)]
        model = dataclasses.replace(exp.model, text_encoder=None, text_config=None)
    else:
        tasks = [dataclasses.replace(t, image_column=None) for t in exp.tasks if t.text_column is not None]
        model = dataclasses.replace(exp.model, image_backbone=None, image_weights=None)
    names = {t.name for t in tasks}
    groups = {g: [t for t in members if t in names] for g, members in (exp.model.groups or {}).items()}
    model = dataclasses.replace(model, groups={g: m for g, m in groups.items() if m} or None, init_from=None,
                                init_heads=False, base=None)
    training = dataclasses.replace(exp.training, recipe="joint", fusion_stages=[],
                                   checkpoint_metric=_part_metric(exp.training, names))
    return dataclasses.replace(exp, name=f"{exp.name}-{modality}", tasks=tasks, model=model,
                               training=training).validate()


def _part_metric(training: TrainingSpec, tasks: set[str]) -> str:
    """The part's checkpoint metric: the run's, or, when it names a task the part lacks (an image part
    ranked by a text-only task's accuracy), the part's mean of the same sense (score or loss)."""
    task = metric_task(training.checkpoint_metric)
    if task is None or task in tasks:
        return training.checkpoint_metric
    if training.checkpoint_metric.startswith("train/"):
        return "train/mean_loss_ewma"
    return "val/mean_score" if training.checkpoint_mode == "max" else "val/mean_loss"


def default_fusion_stages(epochs: int) -> list[StageSpec]:
    """One epoch of fusion and heads on the frozen parts, then `epochs - 1` of everything at the lr:
    Octopod's composition step and its unfreeze. Measured at the fusion benchmark's full scale, frozen
    parts alone trailed joint training (their text part had not learned what the fusion needs) and
    this matched or beat it (docs/ensembles.md)."""
    frozen = StageSpec(epochs=1, freeze=["image", "text"])
    return [frozen, StageSpec(epochs=epochs - 1)] if epochs > 1 else [frozen]


def reported_epochs(exp: Experiment) -> int:
    """The epochs of the run whose reports a sweep sees: the fusion stages of a staged recipe (its
    part models report nothing), the run itself otherwise."""
    tr = exp.training
    if tr.recipe == "staged":
        return sum(s.epochs for s in tr.fusion_stages or default_fusion_stages(tr.epochs))
    return tr.total_epochs


def compose(exp: Experiment, image: str | None, text: str | None) -> Experiment:
    """`exp` as the staged recipe's last step: its backbones from the part models `image` and
    `text` (saved-model folders; None = as `exp.model.init_from` says), trained in `fusion_stages`.
    Per-modality heads (`model.modality_loss`) only when a stage trains a backbone: on frozen parts
    they learn nothing the parts did not, in a fine-tune they keep each encoder learning its own tasks."""
    init_from = dict(exp.model.init_from or {})
    if image is not None:
        for group, members in exp.task_groups().items():
            if any(has_image(exp, exp.task(t)) for t in members):
                init_from.setdefault(group, image)
    if text is not None:
        init_from.setdefault("text", text)
    tr = exp.training
    stages = tr.fusion_stages or default_fusion_stages(tr.epochs)
    tunes = any(not {"image", "text"} <= set(stage.freeze) for stage in stages)
    return dataclasses.replace(
        exp, model=dataclasses.replace(exp.model, init_from=init_from,
                                       modality_loss=exp.model.modality_loss if tunes else 0.0),
        training=dataclasses.replace(tr, recipe="joint", stages=stages, fusion_stages=[]),
    ).validate()


def train_parts(exp: Experiment, fit: Fit) -> Experiment:
    """Train the part models the staged recipe still needs; returns the experiment composed of them."""
    has_text = any(t.text_column is not None for t in exp.tasks)
    if exp.model.image_backbone is None or not has_text or (exp.model.text_encoder or exp.model.text_config) is None:
        raise ConfigError("training.recipe: staged composes an image model and a text model; "
                          "the config needs an image backbone, a text encoder and tasks with text")
    from raymtl.models.multitask import check_module_names

    check_module_names(exp.task_names, list(exp.task_groups()))  # before a part trains: each checks only its own
    given = exp.model.init_from or {}
    image_groups = [g for g, members in exp.task_groups().items() if any(has_image(exp, exp.task(t)) for t in members)]
    trained = {}
    for modality, needed in (("image", any(g not in given for g in image_groups)), ("text", "text" not in given)):
        if needed:
            result = fit(part_experiment(exp, modality))
            trained[modality] = result.best_checkpoint or result.checkpoint
    return compose(exp, trained.get("image"), trained.get("text"))


def fit_recipe(exp: Experiment, fit: Fit) -> TrainResult:
    """Train `exp` by its `training.recipe`; the result is the image + text model's run."""
    if exp.training.recipe == "staged":
        exp = train_parts(exp, fit)
    return fit(exp)
