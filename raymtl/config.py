"""Typed experiment configuration: YAML <-> dataclasses, checked before Ray starts.

One `Experiment` drives everything (data pipeline, model, loop, sweeps). Parsing rejects
unknown keys with a "did you mean" hint and wrong types with the dotted path of the fault, and
checks names (tasks, groups, metrics); checks that need the data itself (files, columns, labels)
live in `raymtl.data.inspection` and `raymtl.preflight`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import yaml

from raymtl.convert import from_dict, join_path
from raymtl.errors import ConfigError, did_you_mean

TASK_KINDS = ("multiclass", "multilabel")
PREDICTION_COLUMNS = ("id", "error")  # every prediction's own columns; a task's are <task>, <task>_prob, <task>_top_k
TASK_METRICS = {"multiclass": ("loss", "accuracy", "macro_f1"),  # a task's validation metrics, by kind
                "multilabel": ("loss", "micro_f1", "macro_f1", "exact_match")}
SAMPLERS = ("shuffled", "proportional", "uniform", "temperature")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("none", "warmup_cosine", "step", "plateau")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # see raymtl.train.precision
FUSION_NORMS = ("layernorm", "none")
RECIPES = ("joint", "staged")
MODEL_PARTS = ("image", "text", "fusion", "heads")  # what stages freeze and lr_multipliers scale
# A transformer trains at a tenth of a CNN's lr: at one lr (1e-3) the fusion benchmark's from-scratch
# BERT learned nothing (text alone 0.25 mean accuracy, image + text below image alone); at 1e-4, 0.61.
DEFAULT_LR_MULTIPLIERS = {"text": 0.1}
# Task names key datasets (`<task>.<split>`), files, metrics and torch modules; group names only torch
# modules, which refuse '' and '.'; an experiment name is one folder under storage_path.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
RUN_NAME_REFUSED = "/\\#?%"  # a path separator, or what a URI reads as its fragment, query or an escape
TASK_COLUMNS = ("label_column", "image_column", "text_column", "id_column")
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # the normalisation when neither data.mean/std nor named image weights set one
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ViewSpec:
    """One image view fed to the image backbone (Octopod's full image + crop)."""

    name: str
    column: str | None = None  # image column; None = the task's `image_column`
    crop: float = 1.0  # centre-crop fraction of the shorter side, before resizing


@dataclass
class TaskSpec:
    """One attribute to predict, with its own labelled train/validation data."""

    name: str
    train: Any  # parquet/CSV path or glob (local or URI); a pandas DataFrame in the Python API
    validation: Any = None
    test: Any = None  # held out: read only by `raymtl evaluate --split test`
    kind: str = "multiclass"
    label_column: str = "label"
    image_column: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    labels: list[Any] | None = None  # explicit label list; default = sorted train labels
    weight: float = 1.0
    label_smoothing: float = 0.0
    threshold: float = 0.5  # multilabel decision threshold
    loss: Callable | None = None  # Python API only: loss(logits, target) -> scalar


@dataclass
class DataSpec:
    image_size: int = 224
    views: list[ViewSpec] = field(default_factory=lambda: [ViewSpec("full")])
    mean: list[float] | None = None  # None = the named image weights' normalisation, else ImageNet's
    std: list[float] | None = None
    tokenizer: str | None = None  # Hugging Face Hub id, or local folder of a tokenizer
    max_length: int = 64
    # Unreadable images: dropped and counted (their rows leave their batch) up to max_bad_fraction
    # of a rank's rows per split and epoch, past it the run stops; false: the first one stops it.
    skip_bad_images: bool = True
    max_bad_fraction: float = 0.001
    shuffle: bool = True  # reshuffle each task's rows every epoch (else read them in stored order)
    cache: str = "auto"  # keep decoded inputs in Ray's object store across epochs: auto | always | never
    read_concurrency: int = 32  # image reads in flight per decode task (URIs, slow mounts: one round trip each)

    def normalization(self) -> tuple[list[float], list[float]]:
        """(mean, std) the images are normalised with."""
        return self.mean or IMAGENET_MEAN, self.std or IMAGENET_STD


@dataclass
class ModelSpec:
    image_backbone: str | None = "resnet18"  # any torchvision classification model; None = no image tower
    image_weights: str | None = None  # torchvision weights name (DEFAULT, IMAGENET1K_V2...) or state_dict file
    image_kwargs: dict[str, Any] | None = None  # builder arguments, e.g. {image_size: 32} for a ViT
    text_encoder: str | None = None  # Hugging Face Hub id, or local folder for transformers.AutoModel
    text_config: dict[str, Any] | None = None  # BertConfig kwargs for a small random encoder
    text_pooling: str = "mean"  # mean | cls
    hidden_dim: int = 256
    dropout: float = 0.1
    fusion_norm: str = "layernorm"  # per-modality LayerNorm + equal-share scale before fusion | none (plain concat)
    modality_dropout: float = 0.0  # training: drop one modality of a row with both, with this probability
    # > 0: each image + text task also gets a head per modality on that modality's features alone, whose
    # losses (times this weight) train beside the fused head's; predictions use the fused head only.
    # 0: no such heads (models saved before format 3)
    modality_loss: float = 1.0
    groups: dict[str, list[str]] | None = None  # task group -> tasks; None = one group
    base: str | None = None  # a saved model to grow: keeps its tasks and heads, adds this config's
    init_from: dict[str, str] | None = None  # group name or "text" -> saved model to take that part from
    init_heads: bool = False  # with init_from: also take fusion + heads when their shapes match
    models_cache: str | None = None  # folder every node sees for fetched models; None = torch/HF caches


@dataclass
class StageSpec:
    """A training stage: some parts frozen, its own epochs and learning rate."""

    epochs: int
    lr: float | None = None  # None = training.lr
    freeze: list[str] = field(default_factory=list)  # image | text | fusion | heads


def check_gpus_per_worker(gpus: float, workers: int, where: str) -> None:
    """A run of several workers needs whole GPUs per worker: NCCL runs one rank per GPU, and Ray puts
    fractional requests on one GPU until it is full, so a fraction would put two ranks on one."""
    if workers > 1 and (gpus < 1 or gpus != int(gpus)):
        raise ConfigError(
            f"{where}: {gpus:g} GPU per worker with up to {workers} workers; a run of several workers needs "
            "a whole number of GPUs per worker (NCCL runs one rank per GPU). GPUs are shared by one-worker runs only"
        )


def worker_range(tr: TrainingSpec) -> tuple[int, int]:
    """(min, max) workers: equal for a fixed worker count."""
    if isinstance(tr.num_workers, int):
        return tr.num_workers, tr.num_workers
    if len(tr.num_workers) != 2:
        raise ConfigError(f"training.num_workers: expected N or [min, max], got {tr.num_workers}")
    return tr.num_workers[0], tr.num_workers[1]


def global_batch(tr: TrainingSpec, world: int) -> int:
    """Rows of one step, all workers together, on `world` workers (`batch_scope`)."""
    return tr.batch_size if tr.batch_scope == "global" else tr.batch_size * world


@dataclass
class TrainingSpec:
    epochs: int = 3
    batch_size: int = 32  # per worker (batch_scope: worker) or for all workers together (global)
    eval_batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    lr_schedule: str = "none"
    warmup_steps: int = 0
    step_size: int = 1  # epochs between decays for `step`
    gamma: float = 0.1
    plateau_patience: int = 1
    grad_clip: float | None = None
    # auto: bf16 autocast on a GPU with bf16, fp16 + gradient scaling on one without, fp32 on the CPU
    precision: str = "auto"
    mixed_precision: bool = True  # the older switch: false = precision fp32 (when precision is auto)
    # model part -> factor on the lr; None = DEFAULT_LR_MULTIPLIERS where the model trains a text encoder,
    # {} = one lr for the whole model
    lr_multipliers: dict[str, float] | None = None
    sampler: str = "shuffled"
    temperature: float = 2.0
    stages: list[StageSpec] = field(default_factory=list)  # empty = one stage of `epochs`
    # joint: one image + text model from the start; staged: an image model and a text model first
    # (each trained as this section says), then composed and trained in `fusion_stages` (raymtl.train.recipes)
    recipe: str = "joint"
    fusion_stages: list[StageSpec] = field(default_factory=list)  # staged; empty = 1 epoch frozen, then fine-tune
    # Workers: N, or [min, max] for an elastic run (Ray Train starts with what the cluster has, at
    # least min, and shrinks or grows between them as nodes go and come back)
    num_workers: int | list[int] = 1
    elastic_resize_interval_s: float = 60.0  # an elastic run looks for a changed cluster this often
    # batch_size is per worker (the global batch grows with the workers) or global (split among them)
    batch_scope: str = "worker"
    # One worker on a local machine trains in this process (Ray Train's local mode; no Train
    # controller or worker processes, Ray started only for data it must stream): auto | always | never
    in_process: str = "auto"
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val/mean_loss"
    checkpoint_mode: str = "min"
    max_failures: int = 0
    max_preemptions: int = -1  # restarts after a node's preemption, counted apart from max_failures (-1: any)
    preemption_grace_s: float = 0.0  # the other workers may run this long past a preemption's deadline
    # Ask Ray Train every N steps whether a node of the run is about to be preempted, and checkpoint
    # at once when it is (0: never ask; the question is a barrier of all workers)
    preemption_check_steps: int = 20
    ewma_alpha: float = 0.1
    affinity_every_steps: int | None = None  # measure inter-task affinity (TAG) every N steps
    affinity_rows: int = 64  # ... on each task's latest rows (its last few batches)
    affinity_lookahead_rows: int | None = 512  # ... each lookahead step on at most this many rows of all tasks together
    collective_timeout_s: int = 1800
    grad_compression: str = "none"  # none | bf16: gradient buckets all-reduced as bf16 (half the bytes)
    deterministic: bool = False
    compile: bool = False  # torch.compile each group's image trunk and the text encoder (see docs/performance.md)
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker (e.g. {"gpu_node": 1})

    @property
    def total_epochs(self) -> int:
        """The epochs one run trains: its `stages`' when it has stages."""
        return sum(s.epochs for s in self.stages) if self.stages else self.epochs


@dataclass
class Experiment:
    name: str
    tasks: list[TaskSpec]
    storage_path: str = "~/raymtl_results"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"unknown task {name!r}; tasks are {[t.name for t in self.tasks]}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_groups(self) -> dict[str, list[str]]:
        """Task group -> tasks; every task in exactly one group."""
        return self.model.groups or {"all": self.task_names}

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (DataFrame sources become a placeholder, callables are dropped)."""
        return _plain(self)

    def validate(self) -> "Experiment":
        _validate(self)
        return self


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "loss"}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return f"<{type(obj).__name__}>"


# ---------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 would make it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; a missing file or malformed YAML is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_experiment(source: str | Path | dict[str, Any]) -> Experiment:
    """Parse a YAML file (or an already-loaded dict) into a validated Experiment.

    A top-level `sweep:` section is `raymtl tune`'s (see `raymtl.tune.sweep.load_sweep`) and is
    ignored here, so one file serves both `raymtl train` and `raymtl tune`.
    """
    raw, where = (source, "config") if isinstance(source, dict) else (read_config(source), str(source))
    raw = {k: v for k, v in raw.items() if k != "sweep"}
    try:
        exp = from_dict(Experiment, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return exp.validate()


# ---------------------------------------------------------------- structural checks


def _choice(value: str, allowed: Sequence[str], path: str, listed: str | None = None) -> None:
    """`value` must be one of `allowed`; `listed` replaces the list of choices in the message when long."""
    if value not in allowed:
        hint = did_you_mean(value, allowed)
        raise ConfigError(f"{path}: unknown value {value!r}{hint}; choose one of {listed or ', '.join(allowed)}")


def _validate(exp: Experiment) -> None:
    """Checks that need no data: names, kinds, choices, groups, ranges."""
    if not isinstance(exp.name, str) or exp.name in ("", ".", "..") or any(c in exp.name for c in RUN_NAME_REFUSED):
        raise ConfigError(f"name: experiment name {exp.name!r} must name one folder under storage_path, also "
                          f"in a URI (not empty, '.' or '..', none of {' '.join(RUN_NAME_REFUSED)})")
    if not exp.tasks:
        raise ConfigError("no tasks configured: `tasks` needs at least one task")
    seen: set[str] = set()
    columns = {f"data.views[{i}].column": v.column for i, v in enumerate(exp.data.views)}
    for i, t in enumerate(exp.tasks):
        where = f"tasks[{i}] ({t.name!r})"
        if not (isinstance(t.name, str) and TASK_NAME.fullmatch(t.name)):
            raise ConfigError(f"tasks[{i}]: task name {t.name!r} may hold only letters, digits, '_' and '-', starting "
                              "with a letter or digit (it names datasets, model modules, files and metrics)")
        if t.name in seen:
            raise ConfigError(f"duplicate task name {t.name!r}: task names must be unique")
        if t.name in PREDICTION_COLUMNS:
            raise ConfigError(f"{where}: task name {t.name!r} is a column of every prediction; rename the task")
        seen.add(t.name)
        _choice(t.kind, TASK_KINDS, f"{where}.kind")
        if t.kind == "multilabel" and t.label_smoothing:
            raise ConfigError(f"{where}.label_smoothing: applies to multiclass tasks only (the task is multilabel)")
        columns.update({f"{where}.{key}": getattr(t, key) for key in TASK_COLUMNS})
        if t.train is None:
            raise ConfigError(f"{where}: `train` source is required")
        if t.image_column is None and t.text_column is None and not any(v.column for v in exp.data.views):
            raise ConfigError(f"{where}: set `image_column` and/or `text_column`: the task has no input")
        if t.labels is not None and len(set(map(str, t.labels))) != len(t.labels):
            raise ConfigError(f"{where}.labels: duplicate labels in {t.labels}")
    for name in seen:
        for clash in (f"{name}_prob", f"{name}_top_k"):
            if clash in seen:
                raise ConfigError(f"tasks {name!r} and {clash!r} would write the same prediction column {clash!r}; "
                                  "rename one")
    for path, column in columns.items():
        if column == "":
            raise ConfigError(f"{path}: a column name cannot be empty")
    view_names = [v.name for v in exp.data.views]
    if len(set(view_names)) != len(view_names):
        raise ConfigError(f"data.views: duplicate view names {view_names}")
    tr, m = exp.training, exp.model
    readers = [t.name for t in exp.tasks if t.image_column is not None]
    if not view_names and readers and m.image_backbone is not None:
        raise ConfigError(f"data.views: empty, but tasks {readers} read images (image_column); "
                          "the image backbone needs at least one view, e.g. [{name: full}]")
    _choice(tr.sampler, SAMPLERS, "training.sampler")
    _choice(tr.optimizer, OPTIMIZERS, "training.optimizer")
    _choice(tr.lr_schedule, LR_SCHEDULES, "training.lr_schedule")
    _choice(tr.checkpoint_mode, ("min", "max"), "training.checkpoint_mode")
    _choice(m.text_pooling, ("mean", "cls"), "model.text_pooling")
    _choice(m.fusion_norm, FUSION_NORMS, "model.fusion_norm")
    for part, factor in (tr.lr_multipliers or {}).items():
        _choice(part, MODEL_PARTS, "training.lr_multipliers")
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ConfigError(f"training.lr_multipliers.{part}: must be > 0, got {factor!r}")
    _choice(exp.data.cache, ("auto", "always", "never"), "data.cache")
    _choice(tr.in_process, ("auto", "always", "never"), "training.in_process")
    _choice(tr.grad_compression, ("none", "bf16"), "training.grad_compression")
    _choice(tr.precision, PRECISIONS, "training.precision")
    _choice(tr.recipe, RECIPES, "training.recipe")
    _choice(tr.batch_scope, ("worker", "global"), "training.batch_scope")
    lo, hi = worker_range(tr)
    if not 1 <= lo <= hi:
        raise ConfigError(f"training.num_workers: expected N >= 1 or [min, max] with 1 <= min <= max, got {tr.num_workers}")
    if tr.batch_scope == "global" and tr.batch_size < hi:
        raise ConfigError(f"training.batch_size: a global batch of {tr.batch_size} leaves some of {hi} workers no row")
    if tr.in_process == "always" and tr.num_workers != 1:
        raise ConfigError(f"training.in_process: always trains in one process; num_workers is {tr.num_workers}")
    if tr.use_gpu and "GPU" in tr.worker_resources:
        check_gpus_per_worker(tr.worker_resources["GPU"], hi, "training.worker_resources.GPU")
    _check_ranges(exp)
    for key in ("stages", "fusion_stages"):
        for i, s in enumerate(getattr(tr, key)):
            for part in s.freeze:
                _choice(part, MODEL_PARTS, f"training.{key}[{i}].freeze")
    if m.groups is not None:
        for group in m.groups:
            if not group or "." in group:
                raise ConfigError(f"model.groups: group name {group!r} must be non-empty without '.' (it keys "
                                  "the group's torch modules)")
        check_groups(m.groups, exp.task_names)
    check_metric(tr.checkpoint_metric, exp, "training.checkpoint_metric")


def epoch_metrics(exp: Experiment) -> list[str]:
    """What each epoch reports that checkpoints and trials can be ranked by (`raymtl.train.report.epoch_row`)."""
    names = ["val/mean_loss", "val/mean_score", "train/mean_loss_ewma"]
    for t in exp.tasks:
        names += [f"val/{t.name}/{key}" for key in TASK_METRICS[t.kind]] + [f"train/{t.name}/loss_ewma"]
    return names


def metric_task(metric: str) -> str | None:
    """The task of a per-task metric (`val/<task>/accuracy`, `train/<task>/loss_ewma`); None for a mean."""
    parts = metric.split("/")
    return parts[1] if len(parts) == 3 else None


def check_metric(metric: str, exp: Experiment, path: str, prefix: str = "") -> None:
    """`metric` is one the epochs report (starting with `prefix`): a typo, or accuracy of a multilabel
    task, would rank nothing and keep only the latest checkpoint."""
    kinds = ", ".join(f"val/<task>/{{{','.join(keys)}}} ({kind})" for kind, keys in TASK_METRICS.items())
    listed = [name for name in epoch_metrics(exp) if name.startswith(prefix)]
    hint = "val/mean_loss, val/mean_score, " + kinds + ("" if prefix else ", train/mean_loss_ewma, train/<task>/loss_ewma")
    _choice(metric, listed, path, listed=hint)


def check_groups(groups: Mapping[str, Sequence[str]], tasks: Sequence[str], where: str = "model.groups") -> None:
    """`groups` ({group: tasks}) partitions `tasks`: no empty group, no unknown task, each task in one group."""
    owner: dict[str, str] = {}
    for group, members in groups.items():
        if not members:
            raise ConfigError(f"{where}.{group}: a task group needs at least one task (it has no tasks)")
        for name in members:
            if name not in tasks:
                raise ConfigError(f"{where}.{group}: unknown task {name!r}; tasks are {list(tasks)}")
            if name in owner:
                raise ConfigError(f"task {name!r} is in two task groups: {owner[name]!r} and {group!r}")
            owner[name] = group
    missing = [t for t in tasks if t not in owner]
    if missing:
        raise ConfigError(f"tasks {missing} are in no task group of {where}")


# Numeric ranges, (section, field) -> rule: a value outside fails here, not as a torch error in a worker.
# Rules: ">0", ">=0", ">=1", "[0,1)", "(0,1)", "(0,1]"; None values (optional fields) are not checked.
_RANGES: dict[str, dict[str, str]] = {
    "": {"seed": ">=0"},
    "tasks": {"weight": ">0", "label_smoothing": "[0,1)", "threshold": "(0,1)"},
    "data.views": {"crop": "(0,1]"},
    "data": {"image_size": ">=8", "max_length": ">=1", "max_bad_fraction": "[0,1]",
             "read_concurrency": ">=1"},
    "model": {"hidden_dim": ">=1", "dropout": "[0,1)", "modality_dropout": "[0,1]", "modality_loss": ">=0"},
    "training.stages": {"epochs": ">=1", "lr": ">0"},
    "training.fusion_stages": {"epochs": ">=1", "lr": ">0"},
    "training": {
        "epochs": ">=1", "batch_size": ">=1", "eval_batch_size": ">=1", "lr": ">0", "weight_decay": ">=0",
        "momentum": "[0,1)", "warmup_steps": ">=0", "step_size": ">=1", "gamma": ">0", "plateau_patience": ">=0",
        "grad_clip": ">0", "temperature": ">0", "cpus_per_worker": ">0", "elastic_resize_interval_s": ">=0",
        "checkpoint_every_steps": ">=1", "keep_checkpoints": ">=1", "max_failures": ">=-1", "max_preemptions": ">=-1", "preemption_grace_s": ">=0",
        "preemption_check_steps": ">=0",
        "ewma_alpha": "(0,1]", "affinity_every_steps": ">=1", "affinity_rows": ">=1",
        "affinity_lookahead_rows": ">=1",
        "collective_timeout_s": ">=1",
    },
}


def _in_range(value: float, rule: str) -> bool:
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    lo, hi = rule[1:-1].split(",")
    above = value >= float(lo) if rule[0] == "[" else value > float(lo)
    below = value <= float(hi) if rule[-1] == "]" else value < float(hi)
    return above and below


def _check_ranges(exp: Experiment) -> None:
    """Every numeric field in its range (and finite): the rule table `_RANGES`."""
    parts: list[tuple[str, Any]] = [
        ("", exp), ("data", exp.data), ("model", exp.model), ("training", exp.training),
        *((f"tasks[{i}] ({t.name!r})", t) for i, t in enumerate(exp.tasks)),
        *((f"data.views ({v.name!r})", v) for v in exp.data.views),
        *((f"training.stages[{i}]", s) for i, s in enumerate(exp.training.stages)),
        *((f"training.fusion_stages[{i}]", s) for i, s in enumerate(exp.training.fusion_stages)),
    ]
    for where, obj in parts:
        section = where.split(" (")[0].split("[")[0]
        for name, rule in _RANGES[section].items():
            value = getattr(obj, name)
            if value is None or isinstance(value, bool):
                continue
            if not math.isfinite(value) or not _in_range(value, rule):
                shown = f"in {rule}" if rule[0] in "[(" else f"{rule.rstrip('-.0123456789')} {rule.lstrip('>=')}"
                raise ConfigError(f"{join_path(where, name)}: must be {shown}, got {value!r}")
    for name, rule in (("mean", "finite"), ("std", "finite and > 0")):
        values = getattr(exp.data, name)
        if values is not None and len(values) != 3:
            raise ConfigError(f"data.{name}: expected 3 values (R, G, B), got {values}")
        if values is not None and not all(math.isfinite(v) and (name == "mean" or v > 0) for v in values):
            raise ConfigError(f"data.{name}: every value must be {rule}, got {values}")
    for name, amount in exp.training.worker_resources.items():
        if not (math.isfinite(amount) and amount >= 0):
            raise ConfigError(f"training.worker_resources.{name}: must be >= 0, got {amount!r}")
