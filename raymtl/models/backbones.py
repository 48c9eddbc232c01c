"""Feature extractors: a multi-view ResNet image tower and a pooled transformers text tower.

Both load weights only from local files: jobs run on clusters without network access, and a silent
download would make a laptop run and a cluster run start from different weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models
from transformers import AutoConfig, AutoModel

from raymtl.config import IMAGE_BACKBONES

RESNETS = {name: getattr(models, name) for name in IMAGE_BACKBONES}


def load_resnet_weights(net: models.ResNet, path: str | Path) -> None:
    """Load a local torchvision ResNet state_dict into `net`, whose `fc` is already removed.

    The file's `fc.*` entries (an ImageNet classifier) are dropped; every other key must match, so a
    file for another architecture fails here rather than training from half-random weights.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"image weights file {str(file)!r} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"image weights file {str(file)!r} is not a readable torch state_dict: {e}") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"image weights file {str(file)!r} holds a {type(state).__name__}, not a state_dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise ValueError(f"image weights file {str(file)!r} does not fit this ResNet: {e}") from e
    if missing or unexpected:
        raise ValueError(
            f"image weights file {str(file)!r} does not match this ResNet: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


class ImageBackbone(nn.Module):
    """One ResNet shared by every view of an image; per-view features are concatenated and fused.

    The views go through the trunk as one stacked batch: one pass instead of one per view.
    """

    def __init__(
        self,
        arch: str,
        view_names: Sequence[str],
        out_dim: int,
        weights: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"unknown image backbone {arch!r}; choose one of {', '.join(RESNETS)}")
        if not view_names:
            raise ValueError("ImageBackbone needs at least one view name")
        self.view_names = list(view_names)
        self.out_dim = out_dim
        self.trunk = RESNETS[arch](weights=None)
        feat_dim = self.trunk.fc.in_features
        self.trunk.fc = nn.Identity()
        if weights is not None:
            load_resnet_weights(self.trunk, weights)
        self.fuse = nn.Sequential(
            nn.Linear(len(self.view_names) * feat_dim, out_dim), nn.ReLU(), nn.Dropout(dropout)
        )

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """`batch["view_<name>"]` float [B, 3, S, S] for each view -> features [B, out_dim]."""
        views = [_view(batch, name) for name in self.view_names]
        feats = self._trunk(torch.cat(views))
        return self.fuse(torch.cat(feats.split(views[0].shape[0]), dim=1))

    def _trunk(self, x: Tensor) -> Tensor:
        if not (self.training and x.shape[0] == 1):
            return self.trunk(x)
        # BatchNorm has no batch statistics over a single image (on 1x1 maps it raises): use the
        # running statistics for this call. Gradients still flow; only the statistics are frozen.
        self.trunk.eval()
        try:
            return self.trunk(x)
        finally:
            self.trunk.train()


def _view(batch: Mapping[str, Any], name: str) -> Tensor:
    key = f"view_{name}"
    if key not in batch:
        raise KeyError(f"batch has no image view {key!r}; its keys are {sorted(map(str, batch))}")
    return batch[key]


class TextEncoder(nn.Module):
    """A transformers encoder pooled to one vector per text: masked mean over tokens, or [CLS].

    Built from a local model directory, or with random weights from config kwargs: a tiny BERT for
    tests, or a saved model's `config.to_dict()` (its `model_type`, default "bert", picks the class).
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError("TextEncoder needs exactly one of `path` (a local model directory) or `config`")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"unknown text pooling {pooling!r}; choose mean or cls")
        if path is not None:
            directory = Path(path).expanduser()
            if not directory.is_dir():  # from_pretrained would otherwise try the Hugging Face Hub
                raise FileNotFoundError(f"text encoder {str(directory)!r} is not a local model directory")
            self.encoder = AutoModel.from_pretrained(str(directory))
        else:
            kwargs = dict(config)
            self.encoder = AutoModel.from_config(AutoConfig.for_model(kwargs.pop("model_type", "bert"), **kwargs))
        # The model's own pooler is never used: parameters that never get a gradient would sit in
        # the optimizer and trip DDP's unused-parameter check.
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        self.pooling = pooling
        self.out_dim: int = self.encoder.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """int64 [B, L] token ids and mask -> features [B, out_dim]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
