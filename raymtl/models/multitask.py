"""The multi-task network: per task group an image backbone and a fusion layer, one head per task.

One group is a plain multi-task model. Several groups form an ensemble with one image backbone per
group, which keeps tasks that interfere destructively from sharing features. The text encoder is
shared by every group. A forward pass for a task runs only what that task needs (its group's
backbone, the text encoder if the task has text, its group's fusion layer and its head), so a step
leaves every other group's parameters without a gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raymtl.config import ConfigError, ModelSpec, check_groups
from raymtl.data.task_info import TaskInfo
from raymtl.models.backbones import ImageBackbone, TextEncoder

# part name -> attribute holding its modules
PARTS = {"image": "image_backbones", "text": "text_encoder", "fusion": "fusion", "heads": "heads"}


class Fusion(nn.Module):
    """Per-modality normalisation, then Linear -> ReLU -> Dropout over concat[image, text].

    With `norm="layernorm"` each modality's features are LayerNorm'd and scaled by sqrt(D / (k d))
    (d the modality's width, D the concatenation's, k the number of modality slots): at
    initialisation every modality holds the same share, 1/k, of the fused vector's squared norm,
    whatever its width or its encoder's output scale, so a wide, randomly initialised text encoder
    cannot drown the image features (a 768-wide BERT's raw features have ~3.6x the norm of a
    ResNet's 256). The LayerNorms' gains are learned, so training may reweight the modalities.
    `norm="none"` is plain concatenation (models saved before format 2).

    A slot is sized 0 when no task of the group has that modality. A missing modality (a task
    without it, a masked modality at evaluation, modality dropout) feeds zeros in its slot, after
    the normalisation, so image-only, text-only and image+text tasks share one layer.
    `modality_dropout` p: in training, each row that has both modalities drops one of them (zeros,
    no rescaling) with probability p, so the fused layer learns to work on either alone.
    """

    def __init__(self, image_dim: int, text_dim: int, out_dim: int, dropout: float, norm: str = "none",
                 modality_dropout: float = 0.0) -> None:
        super().__init__()
        self.image_dim, self.text_dim = image_dim, text_dim
        self.norm, self.modality_dropout = norm, modality_dropout
        if norm == "layernorm":
            slots = [d for d in (image_dim, text_dim) if d]
            total = sum(slots)
            self.image_norm = nn.LayerNorm(image_dim) if image_dim else None
            self.text_norm = nn.LayerNorm(text_dim) if text_dim else None
            self.scales = {name: (total / (len(slots) * d)) ** 0.5
                           for name, d in (("image", image_dim), ("text", text_dim)) if d}
        elif norm != "none":
            raise ValueError(f"unknown fusion norm {norm!r}; choose layernorm or none")
        self.net = nn.Sequential(nn.Linear(image_dim + text_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, image: Tensor | None, text: Tensor | None, rows: int | None = None) -> Tensor:
        """Fused features [B, out_dim]; `rows` (B) is needed only when both modalities are missing."""
        return self.fuse(self.normalised("image", image), self.normalised("text", text), rows)

    def fuse(self, image: Tensor | None, text: Tensor | None, rows: int | None = None) -> Tensor:
        """`forward` of features already `normalised` (a caller that reads them too normalises once)."""
        given = image if image is not None else text
        if given is None:
            given = self.net[0].weight.new_zeros(rows, 0)
        if self.training and self.modality_dropout and image is not None and text is not None:
            image, text = _drop_one(image, text, self.modality_dropout)
        slots = [(image, self.image_dim), (text, self.text_dim)]
        feats = [f if f is not None else given.new_zeros(given.shape[0], dim) for f, dim in slots if dim]
        return self.net(torch.cat(feats, dim=1))

    def parameters_for(self, image: bool, text: bool) -> list[nn.Parameter]:
        """The parameters a pass with these modalities present uses: their norms and the layer."""
        norms = [getattr(self, f"{m}_norm", None) for m, present in (("image", image), ("text", text)) if present]
        return [p for n in norms if n is not None for p in n.parameters()] + list(self.net.parameters())

    def normalised(self, modality: str, features: Tensor | None) -> Tensor | None:
        """One modality's features as they enter the concatenation (see the class docstring)."""
        if features is None or self.norm == "none":
            return features
        return getattr(self, f"{modality}_norm")(features) * self.scales[modality]


def _drop_one(image: Tensor, text: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Zero one modality (image or text, even odds) of each row with probability p."""
    rows = image.shape[0]
    drop = torch.rand(rows, device=image.device) < p
    which = torch.rand(rows, device=image.device) < 0.5
    keep_image = (~(drop & which)).unsqueeze(1).to(image.dtype)
    keep_text = (~(drop & ~which)).unsqueeze(1).to(text.dtype)
    return image * keep_image, text * keep_text


def check_module_names(tasks: Sequence[str], groups: Sequence[str]) -> None:
    """Task and group names key the model's `nn.ModuleDict`s, which refuse their own attributes' names
    (`type`, `train`, `keys`, `to`, ...): found on the driver, not when a worker builds the model."""
    taken = set(dir(nn.ModuleDict()))
    for what, names in (("task", tasks), ("model.groups group", groups)):
        clash = sorted(set(names) & taken)
        if clash:
            raise ConfigError(f"{what} name(s) {clash}: torch's ModuleDict, which the model keys by these names, "
                              "has an attribute of that name; rename it (e.g. a suffix: 'type_')")


class MultiTaskModel(nn.Module):
    """Image backbones per task group, a shared text encoder, fusion per group, a head per task.

    Built from plain data only (see `config` / `from_config`), so any rank, a resumed run or a batch
    predictor rebuilds the same architecture and then loads a state_dict into it.
    """

    def __init__(
        self,
        model: ModelSpec,
        infos: Mapping[str, TaskInfo],
        view_names: Sequence[str],
        groups: Mapping[str, Sequence[str]],
    ) -> None:
        super().__init__()
        _check_groups(infos, groups)
        self.spec = model
        self.view_names = list(view_names)
        self.masked: str | None = None  # a modality evaluated as missing (see `mask`)
        self.infos: dict[str, TaskInfo] = {}
        self.groups: dict[str, list[str]] = {}
        has_text_encoder = model.text_encoder is not None or model.text_config is not None
        self.text_encoder = (
            TextEncoder(model.text_encoder, model.text_config, model.text_pooling)
            if has_text_encoder and any(i.has_text for i in infos.values())
            else None
        )
        self.image_backbones = nn.ModuleDict()
        self.fusion = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.modality_heads = nn.ModuleDict()  # task -> {image, text}: heads on one modality (modality_loss)
        for group, tasks in groups.items():
            self._add_group(group, [infos[t] for t in tasks])

    # ------------------------------------------------------------ plain-data round trip

    def config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that `from_config` rebuilds this architecture from."""
        return {
            "model": dataclasses.asdict(self.spec),
            "infos": {name: info.to_dict() for name, info in self.infos.items()},
            "view_names": list(self.view_names),
            "groups": {group: list(tasks) for group, tasks in self.groups.items()},
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MultiTaskModel:
        """Rebuild from `config()` output; weights then come from the checkpoint's state_dict."""
        return cls(
            ModelSpec(**config["model"]),
            {name: TaskInfo(**info) for name, info in config["infos"].items()},
            config["view_names"],
            config["groups"],
        )

    # ------------------------------------------------------------ structure

    def group_of(self, task: str) -> str:
        for group, tasks in self.groups.items():
            if task in tasks:
                return group
        raise KeyError(f"unknown task {task!r}; the model's tasks are {list(self.infos)}")

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part (image, text, fusion, heads): what a training stage may freeze.
        The per-modality heads (`model.modality_loss`) belong to `heads`."""
        parts = {
            name: list(getattr(self, attr).parameters()) if getattr(self, attr) is not None else []
            for name, attr in PARTS.items()
        }
        parts["heads"] += list(self.modality_heads.parameters())
        return parts

    def freeze(self, parts: Sequence[str]) -> None:
        """Freeze these parts (image, text, fusion, heads), unfreeze the others.

        Frozen parameters get no gradient, and frozen modules stay in eval mode so that
        BatchNorm statistics and dropout do not change them either.
        """
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ConfigError(f"unknown model parts {sorted(unknown)}; parts are {list(PARTS)}")
        self.frozen = tuple(parts)
        for name, params in self.parts().items():
            for p in params:
                p.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiTaskModel:
        super().train(mode)
        for name in getattr(self, "frozen", ()):
            module = getattr(self, PARTS[name])
            if module is not None:
                module.eval()
        return self

    def train_with(self, spec: ModelSpec) -> None:
        """Go on training as `spec` says where a trained model may: dropout and modality dropout (in
        every group: they are no weights, and a resume rebuilds all groups from one spec) and a new
        group's pretrained `image_weights`. The architecture stays this model's."""
        self.spec = dataclasses.replace(self.spec, image_weights=spec.image_weights, dropout=spec.dropout,
                                        modality_dropout=spec.modality_dropout)
        layers = [*(b.fuse for b in self.image_backbones.values()), *(f.net for f in self.fusion.values())]
        for layer in (m for seq in layers for m in seq if isinstance(m, nn.Dropout)):
            layer.p = spec.dropout
        for fusion in self.fusion.values():
            fusion.modality_dropout = spec.modality_dropout

    def add_task(self, info: TaskInfo, group: str) -> None:
        """Add a task to a (trained) model: a new head in `group`, or a new group of its own.

        The existing parameters are untouched. A task needing a modality its group was not built
        with (or text when the model has no text encoder) cannot be attached without a rebuild.
        """
        if info.name in self.infos:
            raise ValueError(f"task {info.name!r} already exists in group {self.group_of(info.name)!r}")
        if group in self.groups:
            self._add_head(info, group)
        else:
            self._add_group(group, [info])

    def update_task(self, info: TaskInfo) -> None:
        """Take a run's threshold and weight for a task this model has, so that the saved model decides as
        the run's validation did. Its head stays as trained: the run must give it the same kind and inputs."""
        old = self.infos[info.name]
        if (info.kind, info.has_image, info.has_text) != (old.kind, old.has_image, old.has_text):
            raise ConfigError(f"task {info.name!r}: the base model's head is {_described(old)}; this config makes "
                              f"it {_described(info)}: list it as the base has it, or under a new name for a new head")
        self.infos[info.name] = dataclasses.replace(old, threshold=info.threshold, weight=info.weight)

    def _add_group(self, group: str, infos: Sequence[TaskInfo]) -> None:
        inputs = [self._inputs(info) for info in infos]
        image_dim = text_dim = 0
        if any(image for image, _ in inputs):
            backbone = ImageBackbone(
                self.spec.image_backbone,
                self.view_names,
                self.spec.hidden_dim,
                weights=self.spec.image_weights,
                dropout=self.spec.dropout,
                kwargs=self.spec.image_kwargs,
            )
            self.image_backbones[group] = backbone
            image_dim = backbone.out_dim
        if any(text for _, text in inputs):
            text_dim = self.text_encoder.out_dim
        self.fusion[group] = Fusion(image_dim, text_dim, self.spec.hidden_dim, self.spec.dropout,
                                    self.spec.fusion_norm, self.spec.modality_dropout)
        self.groups[group] = []
        for info in infos:
            self._add_head(info, group)

    def _add_head(self, info: TaskInfo, group: str) -> None:
        image, text = self._inputs(info)
        fusion = self.fusion[group]
        if (image and not fusion.image_dim) or (text and not fusion.text_dim):
            raise ConfigError(
                f"task {info.name!r} needs {'images' if image and not fusion.image_dim else 'text'}, "
                f"which task group {group!r} was built without; put it in a new group"
            )
        self.heads[info.name] = nn.Linear(self.spec.hidden_dim, info.num_labels)
        if self.spec.modality_loss and image and text:
            self.modality_heads[info.name] = nn.ModuleDict({"image": nn.Linear(fusion.image_dim, info.num_labels),
                                                            "text": nn.Linear(fusion.text_dim, info.num_labels)})
        self.infos[info.name] = info
        self.groups[group].append(info.name)

    def _inputs(self, info: TaskInfo) -> tuple[bool, bool]:
        """Whether a task feeds (image, text): the modalities it has that this model encodes."""
        image = info.has_image and self.spec.image_backbone is not None
        text = info.has_text and self.text_encoder is not None
        if not (image or text):
            raise ConfigError(
                f"task {info.name!r} has no input this model can encode (has_image={info.has_image}, "
                f"has_text={info.has_text}; model.image_backbone={self.spec.image_backbone!r}, "
                f"text encoder {'present' if self.text_encoder is not None else 'absent'})"
            )
        return image, text

    # ------------------------------------------------------------ compute

    def forward(self, batch: Mapping[str, Any], task: str) -> Tensor:
        """Logits [B, num_labels] of `task`, computing only the modules that task uses."""
        return self.heads[task](self.features(batch, task))

    def features(self, batch: Mapping[str, Any], task: str) -> Tensor:
        """The fused features [B, hidden_dim] that `task`'s head reads (its group's backbone, text, fusion)."""
        group, image, text = self._encoded(batch, task)
        return self.fusion[group](image, text, rows=_rows(batch))

    def training_outputs(self, batch: Mapping[str, Any], task: str) -> list[tuple[Tensor, float]]:
        """(logits, loss weight) pairs whose weighted losses a training step sums.

        The fused head's logits, then, where the task has a per-modality head (`model.modality_loss`
        = w > 0, both modalities present), each modality's own logits from its normalised features,
        weighted 1 : w : w and scaled by 1 / (1 + w); without them the fused head's at weight 1.
        The per-modality losses give each encoder a direct signal of its own, as if it trained alone,
        so a modality that is noise for a task, or still weak, cannot slow the other's learning
        through the shared fused layer (gradient blending). The scale keeps each encoder's losses of
        a step at a weight of 1 in all (the fused head's and its own head's), as for a task without
        per-modality heads: a shared encoder (the text encoder that a text-only task also reads)
        is not pulled twice as hard by the image + text tasks.
        """
        group, image, text = self._encoded(batch, task)
        fusion = self.fusion[group]
        image, text = fusion.normalised("image", image), fusion.normalised("text", text)
        fused = self.heads[task](fusion.fuse(image, text, rows=_rows(batch)))
        heads = self._modality_heads(task)
        if heads is None:
            return [(fused, 1.0)]
        w = self.spec.modality_loss
        return [(fused, 1 / (1 + w))] + [(heads[m](f), w / (1 + w)) for m, f in (("image", image), ("text", text))]

    def _modality_heads(self, task: str) -> nn.ModuleDict | None:
        """`task`'s per-modality heads where a pass uses them: built, and both modalities unmasked."""
        _, use_image, use_text = self.feature_key(task)
        return self.modality_heads[task] if task in self.modality_heads and use_image and use_text else None

    def _encoded(self, batch: Mapping[str, Any], task: str) -> tuple[str, Tensor | None, Tensor | None]:
        """(group, image features or None, text features or None) of `task` over a batch."""
        group, use_image, use_text = self.feature_key(task)
        image = self.image_backbones[group](batch) if use_image else None
        text = self.text_encoder(batch["input_ids"], batch["attention_mask"]) if use_text else None
        return group, image, text

    def mask(self, modality: str | None) -> None:
        """Evaluate with `modality` ("image" or "text") masked, or none (None): a masked modality
        is not computed and feeds zeros into its fusion slot, as for a task that lacks it."""
        if modality not in (None, "image", "text"):
            raise ValueError(f"unknown modality {modality!r} to mask; choose image or text")
        self.masked = modality

    def compile_features(self, **options: Any) -> None:
        """`torch.compile` each group's image trunk and the text encoder, in place.

        The compiled units take plain tensors and are shared by all tasks of a group, so N steps
        over many tasks compile each unit a bounded number of times (train/eval, a new batch size)
        instead of once per task. The task-dispatching `forward` stays eager: compiling it would
        specialise on the task name. In place (`nn.Module.compile`), so state_dict keys, checkpoints
        and DDP are unchanged. `options` go to `torch.compile` (e.g. `backend`, `mode`).
        """
        for backbone in self.image_backbones.values():
            backbone.trunk.compile(**options)
        if self.text_encoder is not None:
            self.text_encoder.compile(**options)

    def parameters_for(self, task: str) -> list[nn.Parameter]:
        """The parameters a forward pass of `task` uses (see `features`), in a fixed order.

        Every rank derives the same list from the task alone, whatever its batch held, which is
        what lets ranks synchronise exactly these gradients (`raymtl.train.gradsync`).
        """
        group, use_image, use_text = self.feature_key(task)
        encoders = [self.image_backbones[group] if use_image else None, self.text_encoder if use_text else None]
        modality_heads = self._modality_heads(task)
        return [p for m in encoders if m is not None for p in m.parameters()] + [
            *self.fusion[group].parameters_for(use_image, use_text), *self.heads[task].parameters(),
            *(modality_heads.parameters() if modality_heads is not None else ())]

    def feature_key(self, task: str) -> tuple[str, bool, bool]:
        """(group, uses image, uses text): tasks with equal keys read equal `features` of a batch.

        A predictor computes the features once per key and applies every such task's head to them.
        """
        image, text = self._inputs(self.infos[task])
        return self.group_of(task), image and self.masked != "image", text and self.masked != "text"


def _described(info: TaskInfo) -> str:
    """A task's kind and inputs, in words: "multiclass on image + text"."""
    inputs = [m for m, given in (("image", info.has_image), ("text", info.has_text)) if given]
    return f"{info.kind} on {' + '.join(inputs) or 'no input'}"


def _rows(batch: Mapping[str, Any]) -> int:
    """The batch's row count, read off its first tensor."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))


def _check_groups(infos: Mapping[str, TaskInfo], groups: Mapping[str, Sequence[str]]) -> None:
    """Infos keyed by their own task names, and `groups` a partition of those tasks."""
    for name, info in infos.items():
        if info.name != name:
            raise ConfigError(f"task info keyed {name!r} is named {info.name!r}")
    check_groups(groups, list(infos), "task groups")
