"""The `sweep:` section of a sweep config: what varies between trials, checked before Ray starts.

Imports no torch or Ray: `raymtl tune` names a faulty sweep in a second. `param_space` is Tune's
search space of the section; `apply_config` and `trial_experiment` turn one Tune config back into
the experiment that trial trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymtl.config import ConfigError, Experiment, check_metric, read_config
from raymtl.convert import from_dict
from raymtl.tune.resources import with_trial_gpus

if TYPE_CHECKING:
    from raymtl.tune.groupings import Grouping

SEARCH = "search"
# Tune config key -> the SweepSpec field listing its values.
AXES = {
    "seed": "seeds",
    "backbone": "backbones",
    "lr": "lr",
    "batch_size": "batch_size",
    "sampler": "sampler",
    "temperature": "temperature",
    "recipe": "recipes",
}
TRAINING_KEYS = ("lr", "batch_size", "sampler", "temperature", "recipe")


@dataclass
class Range:
    """A continuous range for a hyperparameter: `sweep.num_samples` draws (log-uniform unless `log: false`)."""

    min: float
    max: float
    log: bool = True

    def draw(self, n: int, rng: random.Random) -> list[float]:
        """`n` values, uniform in the range (in its logarithm with `log`)."""
        if self.log:
            return [math.exp(rng.uniform(math.log(self.min), math.log(self.max))) for _ in range(n)]
        return [rng.uniform(self.min, self.max) for _ in range(n)]


@dataclass
class AshaSpec:
    """Early stopping (ASHA) by epoch: trials below the top 1/reduction_factor stop at each rung."""

    max_t: int | None = None  # epochs; None = the experiment's epochs
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepSpec:
    """The `sweep:` section: what varies between trials and how they are compared."""

    # a list of {group: [tasks]}, "search", or None = the experiment's model.groups
    groupings: list[dict[str, list[str]]] | str | None = None
    max_groups: int = 2  # search: at most this many groups (backbones)
    top: int = 2  # search: train the `top` best-scoring groupings
    baselines: bool = True  # also train all-in-one-group and one-group-per-task
    seeds: list[int] | None = None  # ensemble members; None = the experiment's seed
    backbones: list[str] | None = None
    lr: list[float] | Range | None = None
    batch_size: list[int] | None = None
    sampler: list[str] | None = None
    temperature: list[float] | None = None
    recipes: list[str] | None = None  # training.recipe per trial: [joint, staged] compares the two
    num_samples: int = 1  # draws of a range (each a grid value: every seed and grouping trains each)
    metric: str = "val/mean_score"
    mode: str = "max"
    asha: AshaSpec | None = None
    max_concurrent: int | None = None  # None = as many as the cluster holds (`raymtl.tune.resources.concurrency`)
    gpus_per_trial: float | None = None  # GPUs per trial; fractions for one-worker trials (0.25: four share a GPU)
    affinity_epochs: int = 1  # search run length
    affinity_every_steps: int | None = None  # search run: measure Z every N steps; None = `affinity_interval`
    affinity_share: float = 0.1  # ... the default N keeps the measurements' compute at most this share of the run
    ensemble: bool = False  # also save the chosen configuration's members as one ensemble model

    def validate(self, exp: Experiment) -> "SweepSpec":
        """Every listed value is applied to `exp` and checked like a config, naming `sweep.<key>[i]`."""
        if isinstance(self.groupings, str) and self.groupings != SEARCH:
            raise ConfigError(
                f"sweep.groupings: expected a list of groupings or {SEARCH!r}, got {self.groupings!r}"
            )
        if self.mode not in ("min", "max"):
            raise ConfigError(f"sweep.mode: must be 'min' or 'max', got {self.mode!r}")
        counts = ("max_groups", "top", "num_samples", "max_concurrent", "affinity_epochs", "affinity_every_steps")
        for key in counts:
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"sweep.{key}: must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_trial is not None and self.gpus_per_trial <= 0:
            raise ConfigError(f"sweep.gpus_per_trial: must be > 0, got {self.gpus_per_trial}")
        if self.gpus_per_trial is not None:
            with_trial_gpus(exp, self.gpus_per_trial)  # refuses a fraction of a GPU per worker of several
        if not 0 < self.affinity_share <= 1:
            raise ConfigError(f"sweep.affinity_share: must be in (0, 1], got {self.affinity_share}")
        check_metric(self.metric, exp, "sweep.metric", prefix="val/")
        if self.num_samples > 1 and not isinstance(self.lr, Range):
            raise ConfigError(
                "sweep.num_samples: repeats would be identical trials when nothing is sampled; "
                "list `seeds` for ensemble members, or give `lr` a {min, max} range"
            )
        _check_range(self.lr)
        _check_asha(self.asha)
        for field_name, _, values in self._listed():
            if not values:
                raise ConfigError(f"sweep.{field_name}: an empty list leaves nothing to train; leave the key out")
            if len(set(map(hashable, values))) != len(values):
                raise ConfigError(f"sweep.{field_name}: duplicate values in {values}")
        for where, variant in self.variants(exp):
            try:
                variant.validate()
                if self.backbones and variant.model.image_backbone:
                    from raymtl.models.hub import check_image_backbone  # imports torchvision: only when listed

                    check_image_backbone(variant.model.image_backbone)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        return self

    def _listed(self) -> list[tuple[str, str, list]]:
        """(`sweep.` field, Tune config key, values) of every axis given as a list."""
        fields = {"grouping": "groupings", **AXES}
        return [(f, key, getattr(self, f)) for key, f in fields.items() if isinstance(getattr(self, f), list)]

    def variants(self, exp: Experiment) -> Iterator[tuple[str, Experiment]]:
        """(`sweep.<field>[i]`, exp with that one value applied) for every listed value."""
        for field_name, key, values in self._listed():
            for i, value in enumerate(values):
                yield f"sweep.{field_name}[{i}]", apply_config(exp, {key: value})


def hashable(value: Any) -> str:
    """A value's JSON text: equal for equal configs, lists and dicts included."""
    return json.dumps(value, sort_keys=True)


def _check_range(lr: Any) -> None:
    """Learning rates are > 0, drawn on a linear scale (`log: false`) too: a trial fails inside Tune on one."""
    if isinstance(lr, Range) and not 0 < lr.min < lr.max < math.inf:
        raise ConfigError(f"sweep.lr: need 0 < min < max (finite), got min={lr.min} max={lr.max}")
    if isinstance(lr, list) and any(v <= 0 for v in lr):
        raise ConfigError(f"sweep.lr: learning rates must be > 0, got {lr}")


def _check_asha(asha: AshaSpec | None) -> None:
    if asha is None:
        return
    if asha.grace_period < 1 or (asha.max_t is not None and asha.max_t < asha.grace_period):
        raise ConfigError(f"sweep.asha: need 1 <= grace_period <= max_t, got {asha}")
    if asha.reduction_factor <= 1:
        raise ConfigError(f"sweep.asha.reduction_factor: must be > 1, got {asha.reduction_factor}")


def load_sweep(
    path: str | Path, overrides: Callable[[Experiment], Experiment] | None = None
) -> tuple[Experiment, SweepSpec]:
    """The experiment and its `sweep:` section from one YAML file, both checked before Ray starts.

    `overrides` (the command line's flags) change the experiment before the sweep is checked against
    it: a setting a flag makes valid is not refused, one a flag breaks is found here."""
    raw = read_config(path)
    if "sweep" not in raw:
        raise ConfigError(f"{path}: a sweep config needs a top-level `sweep:` section")
    try:
        exp = from_dict(Experiment, {k: v for k, v in raw.items() if k != "sweep"}, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if overrides is not None:
        exp = overrides(exp)  # its errors name their flag
    try:
        spec = from_dict(SweepSpec, {} if raw["sweep"] is None else raw["sweep"], "sweep").validate(exp)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return exp, spec


def apply_config(exp: Experiment, config: dict[str, Any]) -> Experiment:
    """`exp` with a trial's values (Tune config keys; "grouping" holds the {group: tasks} itself)."""
    training = dataclasses.replace(exp.training, **{k: config[k] for k in TRAINING_KEYS if k in config})
    model = exp.model
    if "grouping" in config:
        model = dataclasses.replace(model, groups=config["grouping"])
    if "backbone" in config:
        model = dataclasses.replace(model, image_backbone=config["backbone"])
    return dataclasses.replace(exp, seed=config.get("seed", exp.seed), model=model, training=training)


def trial_experiment(
    exp: Experiment,
    spec: SweepSpec,
    groupings: dict[str, Grouping],
    config: dict[str, Any],
    name: str,
    storage_path: str,
) -> Experiment:
    """The training a trial runs: its overrides, checkpoints kept by the sweep metric, its own run folder."""
    trial = apply_config(exp, {**config, "grouping": groupings[config["grouping"]]})
    training = dataclasses.replace(trial.training, checkpoint_metric=spec.metric, checkpoint_mode=spec.mode)
    return dataclasses.replace(trial, name=name, storage_path=storage_path, training=training).validate()


def param_space(spec: SweepSpec, grouping_names: Sequence[str], seed: int) -> dict[str, Any]:
    """Tune's search space: a grid over every listed value and over `num_samples` draws of a range.

    A range is drawn here, once (from `seed`), not by Tune per trial: every seed and grouping of a
    draw then trains with the same value, so a configuration has all its seeds (ensemble members)
    to average, and groupings are compared at equal learning rates.
    """
    from ray import tune

    space: dict[str, Any] = {"grouping": tune.grid_search(list(grouping_names))}
    for key, spec_field in AXES.items():
        values = getattr(spec, spec_field)
        if isinstance(values, Range):
            space[key] = tune.grid_search(values.draw(spec.num_samples, random.Random(f"{seed}/{key}")))
        elif values is not None:
            space[key] = tune.grid_search(values)
    return space


def n_trials(space: dict[str, Any]) -> int:
    return math.prod(len(v["grid_search"]) for v in space.values() if isinstance(v, dict))


def affinity_interval(
    num_tasks: int, rows: int, lookahead_rows: int | None, batch_size: int, share: float = 0.1
) -> int:
    """Steps between affinity measurements that keep their compute at most `share` of the training.

    In rows-forward units (a backward ~ two forwards): a training step is 3 * batch_size; a
    measurement (`raymtl.train.affinity.lookahead_affinity`) is T forward+backward passes on `rows`
    rows plus T (T+1 with a capped `lookahead_rows`) forward passes of the targets' rows, so the
    interval grows linearly with T once `lookahead_rows` caps the targets' rows.
    """
    keep = rows if lookahead_rows is None else min(rows, max(1, lookahead_rows // num_tasks))
    passes = num_tasks + (keep < rows)
    measurement = 3 * num_tasks * rows + passes * num_tasks * keep
    return max(1, math.ceil(measurement / (share * 3 * batch_size)))
