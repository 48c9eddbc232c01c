"""The one way a training run gets its model: fresh, grown from a saved model, or composed of parts.

- fresh: `MultiTaskModel` seeded by the experiment seed (identical on every rank);
- `model.base`: a saved model whose tasks, heads and label maps are kept; this config's new tasks get
  new heads (in the group `model.groups` names, or a new group of that name);
- `model.init_from`: per task group (and "text") a saved model whose image backbone (text encoder)
  is loaded into the new model — Octopod's "core models" composed into an ensemble.
"""

from __future__ import annotations

import logging

import torch

from raymtl.config import ConfigError, DataSpec, Experiment
from raymtl.data.task_info import TaskInfo
from raymtl.models.artifact import load
from raymtl.models.multitask import MultiTaskModel

logger = logging.getLogger("raymtl")


def build_model(exp: Experiment, infos: dict[str, TaskInfo]) -> MultiTaskModel:
    if exp.model.base:
        model = grow(exp, infos)
    else:
        torch.manual_seed(exp.seed)
        model = MultiTaskModel(exp.model, infos, [v.name for v in exp.data.views], exp.task_groups())
    for part, path in (exp.model.init_from or {}).items():
        load_part(model, part, path, data=exp.data, with_heads=exp.model.init_heads)
    return model


def base_label_maps(path: str) -> dict[str, list[str]]:
    """Label names of a saved model's tasks: tasks trained again must keep them."""
    return {name: info.labels for name, info in load(path).infos.items()}


def grow(exp: Experiment, infos: dict[str, TaskInfo]) -> MultiTaskModel:
    """The saved model `model.base` with a new head for every task of `infos` it does not have yet, and
    the config's threshold and weight for those it has.

    Its architecture is the base's; it trains with the config's dropout settings, and a new group's
    image backbone starts from the config's `image_weights`.
    """
    path, groups = exp.model.base, exp.task_groups()
    saved = load(path)
    _check_images(saved.data, exp.data, f"model.base ({path})")
    model = saved.model
    model.train_with(exp.model)
    torch.manual_seed(exp.seed)
    for name, info in infos.items():
        if name in model.infos:
            model.update_task(info)
        else:
            model.add_task(info, next(g for g, tasks in groups.items() if name in tasks))
    return model.train()


def _check_images(source: DataSpec, data: DataSpec, what: str) -> None:
    """A trained image backbone reads images as it was trained on them: the same views in the same order
    (names and crops; their fuse layer's weights are per view), image size and normalisation."""
    for key, ours, theirs in (("data.views", _views(data), _views(source)),
                              ("data.image_size", data.image_size, source.image_size),
                              ("data.mean / std", [list(x) for x in data.normalization()],
                               [list(x) for x in source.normalization()])):
        if ours != theirs:
            raise ConfigError(f"{what}: {key} is {ours} here but {theirs} in that model")


def _views(data: DataSpec) -> list[str]:
    return [v.name if v.crop == 1.0 else f"{v.name} (crop {v.crop:g})" for v in data.views]


def load_part(model: MultiTaskModel, part: str, path: str, *, data: DataSpec, with_heads: bool) -> None:
    """Copy one trained part ("text", or a task group's image backbone) from the saved model at `path`."""
    saved = load(path)
    source = saved.model
    if part == "text":
        if model.text_encoder is None or source.text_encoder is None:
            raise ConfigError(f"model.init_from.text: both models need a text encoder ({path})")
        _copy(model.text_encoder, source.text_encoder, f"text encoder from {path}")
        return
    if part not in model.image_backbones:
        raise ConfigError(f"model.init_from: {part!r} is no task group with an image backbone; "
                          f"groups are {sorted(model.image_backbones)}")
    _check_images(saved.data, data, f"model.init_from.{part} ({path})")
    src_group = part if part in source.image_backbones else _only_group(source, path)
    _copy(model.image_backbones[part], source.image_backbones[src_group], f"image backbone {src_group!r} of {path}")
    if with_heads:  # what fits: an image-only part's fusion has other shapes in an image+text model
        _copy_if_fits(model.fusion[part], source.fusion[src_group], f"model.init_from.{part}: fusion {src_group!r} of {path}")
        for task in model.groups[part]:
            if task not in source.heads:
                continue
            what = f"model.init_from.{part}: head {task!r} of {path}"
            if source.infos[task].labels != model.infos[task].labels:
                logger.warning("%s not taken: its labels differ", what)
            else:
                _copy_if_fits(model.heads[task], source.heads[task], what)


def _only_group(source: MultiTaskModel, path: str) -> str:
    if len(source.image_backbones) != 1:
        raise ConfigError(f"{path} has image backbones {sorted(source.image_backbones)}: "
                          "name the task group after the one to take")
    return next(iter(source.image_backbones))


def _copy(target: torch.nn.Module, source: torch.nn.Module, what: str) -> None:
    mismatch = _mismatch(target, source)
    if mismatch:
        raise ConfigError(f"cannot load the {what}: its shapes differ ({mismatch})")
    target.load_state_dict(source.state_dict())


def _copy_if_fits(target: torch.nn.Module, source: torch.nn.Module, what: str) -> None:
    mismatch = _mismatch(target, source)
    if mismatch:
        logger.warning("%s not taken: its shapes differ (%s)", what, mismatch)
    else:
        target.load_state_dict(source.state_dict())


def _mismatch(target: torch.nn.Module, source: torch.nn.Module) -> str | None:
    """The first weight whose shape differs, or which one side lacks, as `name: shape here, shape there`."""
    ours, theirs = target.state_dict(), source.state_dict()
    for name in [*ours, *(k for k in theirs if k not in ours)]:
        here, there = (tuple(d[name].shape) if name in d else "absent" for d in (ours, theirs))
        if here != there:
            return f"{name}: {here} here, {there} there"
    return None
