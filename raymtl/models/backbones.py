"""Feature extractors: a multi-view image tower (any torchvision classification model) and a
pooled transformers text tower.

Both load weights only from local files: named models are fetched once by the driver
(`raymtl.models.hub`), so every worker, node and resumed run starts from the same files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models
from transformers import AutoConfig, AutoModel


def image_trunk(arch: str, kwargs: Mapping[str, Any] | None = None) -> tuple[nn.Module, int, str]:
    """(torchvision `arch` without its classifier, feature dim, the classifier's module name).

    The classifier is the model's last Linear layer (`fc`, `classifier.3`, `heads.head`...); it
    becomes an Identity, so the trunk returns the features that layer read.
    """
    net = models.get_model(arch, weights=None, **dict(kwargs or {}))
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"image backbone {arch!r} has no Linear classifier to remove")
    head, layer = linears[-1]
    net.set_submodule(head, nn.Identity())
    return net, layer.in_features, head


def load_image_weights(net: nn.Module, head: str, path: str | Path, *, assign: bool = False) -> None:
    """Load a local state_dict into `net`, whose classifier `head` is already removed.

    The file's classifier entries (ImageNet's, or any number of classes) are dropped; every other key
    must match, so a file for another architecture fails here rather than training from half-random
    weights. `assign=True` loads into a model on the meta device: a check that reads no tensor data.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"image weights file {str(file)!r} does not exist")
    try:
        state = _read_state_dict(file)
    except Exception as e:
        raise ValueError(f"image weights file {str(file)!r} is not a readable torch state_dict: {e}") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"image weights file {str(file)!r} holds a {type(state).__name__}, not a state_dict")
    state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise ValueError(f"image weights file {str(file)!r} does not fit this backbone: {e}") from e
    if missing or unexpected:
        raise ValueError(
            f"image weights file {str(file)!r} does not match this backbone: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _read_state_dict(file: Path) -> Any:
    try:  # memory-mapped: tensors are read as they are copied into the model
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def check_image_weights(arch: str, path: str, kwargs: Mapping[str, Any] | None = None) -> None:
    """Fail (naming the file) unless `path` loads into `arch`; builds nothing real, reads no tensor data."""
    with torch.device("meta"):
        net, _, head = image_trunk(arch, kwargs)
    load_image_weights(net, head, path, assign=True)


class ImageBackbone(nn.Module):
    """One torchvision trunk shared by every view of an image; per-view features are concatenated and fused.

    The views go through the trunk as one stacked batch: one pass instead of one per view.
    """

    def __init__(
        self,
        arch: str,
        view_names: Sequence[str],
        out_dim: int,
        weights: str | None = None,
        dropout: float = 0.0,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not view_names:
            raise ValueError("ImageBackbone needs at least one view name")
        self.view_names = list(view_names)
        self.out_dim = out_dim
        self.trunk, feat_dim, head = image_trunk(arch, kwargs)
        if weights is not None:
            load_image_weights(self.trunk, head, weights)
        self.fuse = nn.Sequential(
            nn.Linear(len(self.view_names) * feat_dim, out_dim), nn.ReLU(), nn.Dropout(dropout)
        )

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """`batch["view_<name>"]` float [B, 3, S, S] for each view -> features [B, out_dim]."""
        views = [_view(batch, name) for name in self.view_names]
        feats = self._trunk(torch.cat(views))
        return self.fuse(torch.cat(feats.split(views[0].shape[0]), dim=1))

    def _trunk(self, x: Tensor) -> Tensor:
        if x.is_cuda:  # cuDNN's convolutions are fastest on NHWC; the weights stay as they are stored
            x = x.contiguous(memory_format=torch.channels_last)
        if not (self.training and x.shape[0] == 1):
            return _main_output(self.trunk(x))
        # BatchNorm has no batch statistics over a single image (on 1x1 maps it raises): use the
        # running statistics for this call. Gradients still flow; only the statistics are frozen.
        self.trunk.eval()
        try:
            return _main_output(self.trunk(x))
        finally:
            self.trunk.train()


def _main_output(out: Any) -> Tensor:
    """GoogLeNet and Inception return (main, aux...) tuples in training mode: the main output."""
    return out[0] if isinstance(out, tuple) else out


def _view(batch: Mapping[str, Any], name: str) -> Tensor:
    key = f"view_{name}"
    if key not in batch:
        raise KeyError(f"batch has no image view {key!r}; its keys are {sorted(map(str, batch))}")
    return batch[key]


class TextEncoder(nn.Module):
    """A transformers encoder pooled to one vector per text: masked mean over tokens, or [CLS].

    Built from a local model directory, or with random weights from config kwargs: a tiny BERT for
    tests, or a saved model's `config.to_dict()` (its `model_type`, default "bert", picks the class).
    Always in float32, whatever dtype the files record (transformers keeps a checkpoint's bf16 / fp16):
    training keeps float32 master weights and autocasts, and a half-precision encoder beside the
    float32 image tower and heads would fail an fp32 run's matmuls.
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
                raise FileNotFoundError(f"text encoder {str(directory)!r} is not a local model directory "
                                        "(Hub ids are resolved to one by raymtl.models.hub.resolve_models)")
            self.encoder = AutoModel.from_pretrained(str(directory), dtype=torch.float32)
        else:
            kwargs = dict(config)
            self.encoder = AutoModel.from_config(AutoConfig.for_model(kwargs.pop("model_type", "bert"), **kwargs),
                                                 dtype=torch.float32)
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
