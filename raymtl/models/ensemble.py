"""Several saved models that predict as one: the weighted mean of their per-task probabilities.

    raymtl_model.json   {"ensemble": {"members": ["members/0", ...], "weights": [...]}}, plus the
                        tasks (label maps), data spec and experiment of the first member
    members/<k>/        a copy of each member's saved-model folder
    tokenizer/          the first member's tokenizer, when the members read text

Members may differ in task groups, backbone or seed; they must predict the same tasks with the
same label maps (and kinds and thresholds), and preprocess inputs alike (the same data spec, and
tokenizer folders with the same files), since prediction decodes every item once for all of them.
An ensemble of K members costs about K times one member: all of them run in the same actor.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import Tensor, nn

from raymtl import storage
from raymtl.config import ConfigError, DataSpec, from_dict
from raymtl.models.multitask import MultiTaskModel

ENSEMBLE_KEY = "ensemble"
MEMBERS_DIR = "members"
_EPS = 1e-7  # probabilities are clamped to [eps, 1 - eps] before taking logs


class EnsembleModel(nn.Module):
    """Members (MultiTaskModel) and their weights (summing to 1); `forward` gives pseudo-logits.

    `forward(batch, task)` returns log(p) (multiclass) or logit(p) (multilabel) of the averaged
    probabilities p, so softmax/sigmoid of it is p and the training losses of it are the
    ensemble's negative log-likelihood: callers treat it like one model's logits.
    """

    def __init__(self, members: Sequence[MultiTaskModel], weights: Sequence[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.as_tensor(normalized(weights, len(members)), dtype=torch.float32))
        self.infos = members[0].infos

    def forward(self, batch: dict[str, Any], task: str) -> Tensor:
        probs = sum(w * probabilities(m(batch, task), self.infos[task].kind)
                    for w, m in zip(self.weights, self.members))
        return as_logits(probs, self.infos[task].kind)


def members_of(model: nn.Module) -> list[tuple[float, MultiTaskModel]]:
    """(weight, member) pairs: an ensemble's members, or a single model with weight 1."""
    if isinstance(model, EnsembleModel):
        return [(float(w), m) for w, m in zip(model.weights, model.members)]
    return [(1.0, model)]


def probabilities(logits: Tensor, kind: str) -> Tensor:
    """Softmax (multiclass) or sigmoid (multilabel) of float32 logits."""
    return logits.float().softmax(1) if kind == "multiclass" else logits.float().sigmoid()


def as_logits(probs: Tensor, kind: str) -> Tensor:
    """The inverse of `probabilities` (up to softmax's shift): log p, or log(p / (1 - p))."""
    p = probs.clamp(_EPS, 1 - _EPS)
    return p.log() if kind == "multiclass" else p.log() - (-p).log1p()


def normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights summing to 1 (None = equal weights); a wrong count or a negative weight is a ConfigError."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} ensemble weights for {n} members; give one weight per member")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
    return [w / sum(weights) for w in weights]


# ---------------------------------------------------------------- building the folder


def check_members(
    metas: Sequence[dict[str, Any]], names: Sequence[str], tokenizers: Sequence[Mapping[str, str]]
) -> None:
    """Same tasks, label maps, kinds and thresholds, and the same preprocessing, in every member.

    Tasks are matched by name: a member saves them in its grouping's order, which members may differ in.
    `tokenizers` are the members' `tokenizer_files`: every saved model names its tokenizer "tokenizer",
    so only the files tell a BERT member's token ids from a RoBERTa member's, and the ensemble keeps one.
    """
    from raymtl.models.artifact import TOKENIZER_DIR

    if len(metas) < 1:
        raise ConfigError("an ensemble needs at least one member")
    first, first_name = metas[0], names[0]
    for meta, name, tokenizer in zip(metas, names, tokenizers):
        if ENSEMBLE_KEY in meta:
            raise ConfigError(f"member {name} is itself an ensemble; list its members instead")
        if set(meta["tasks"]) != set(first["tasks"]):  # a set: the saved order follows the member's grouping
            raise ConfigError(
                f"member {name} has tasks {sorted(meta['tasks'])}, member {first_name} has {sorted(first['tasks'])}; "
                "ensemble members must predict the same tasks"
            )
        for task, info in meta["tasks"].items():
            ref = first["tasks"][task]
            for key in ("labels", "kind", "threshold"):
                if info[key] != ref[key]:
                    raise ConfigError(
                        f"task {task!r}: member {name} has {key} {info[key]!r}, member {first_name} has "
                        f"{ref[key]!r}; ensemble members must agree on every task's {key}"
                    )
        data, ref = dict(meta["data"]), dict(first["data"])
        if (data.pop("tokenizer") == TOKENIZER_DIR) != (ref.pop("tokenizer") == TOKENIZER_DIR) or data != ref:
            raise ConfigError(
                f"member {name} preprocesses inputs differently from member {first_name} "
                f"(data spec {meta['data']} vs {first['data']}); ensemble members must share it"
            )
        if tokenizer != tokenizers[0]:
            differ = sorted(f for f in {*tokenizer, *tokenizers[0]} if tokenizer.get(f) != tokenizers[0].get(f))
            raise ConfigError(
                f"member {name} tokenizes text differently from member {first_name} (tokenizer files {differ} "
                "differ); ensemble members must share the tokenizer, since each text is tokenized once for all"
            )


def tokenizer_files(member: str, meta: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each file of the member's own tokenizer folder, by its path there ({} without one)."""
    from raymtl.models.artifact import TOKENIZER_DIR

    if meta["data"].get("tokenizer") != TOKENIZER_DIR:
        return {}
    fs, root = storage.resolve(storage.join(member, TOKENIZER_DIR))
    files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    digests: dict[str, str] = {}
    for f in files:
        with fs.open_input_stream(f.path) as stream:
            digests[posixpath.relpath(f.path, root)] = hashlib.sha256(stream.read()).hexdigest()
    return digests


def build_ensemble(members: Sequence[str], out: str, weights: Sequence[float] | None = None) -> str:
    """Write the ensemble folder `out` (local or URI) from saved-model folders; returns its location."""
    from raymtl.models.artifact import META_FILE, TOKENIZER_DIR, read_meta_at

    if not members:
        raise ConfigError("an ensemble needs at least one member")
    metas = [read_meta_at(m) for m in members]
    check_members(metas, list(members), [tokenizer_files(m, meta) for m, meta in zip(members, metas)])
    weights = normalized(weights, len(members))
    if storage.exists(out):
        raise ConfigError(f"output {out!r} already exists; choose another folder")
    paths = [f"{MEMBERS_DIR}/{k}" for k in range(len(members))]
    for member, path in zip(members, paths):
        copy_dir(member, storage.join(out, path))
    data = metas[0]["data"]
    if data.get("tokenizer") == TOKENIZER_DIR:
        copy_dir(storage.join(members[0], TOKENIZER_DIR), storage.join(out, TOKENIZER_DIR))
    meta = {
        "format_version": metas[0]["format_version"],
        ENSEMBLE_KEY: {"members": paths, "weights": weights, "sources": [storage.normalize(m) for m in members]},
        "tasks": metas[0]["tasks"],
        "data": data,
        "experiment": metas[0]["experiment"],
    }
    storage.write_text(storage.join(out, META_FILE), json.dumps(meta, indent=2))
    return storage.normalize(out)


def load_members(folder: str, meta: dict[str, Any], map_location: Any) -> tuple[EnsembleModel, DataSpec]:
    """The ensemble of a local folder (see `raymtl.models.artifact.load`) and its data spec."""
    from raymtl.models.artifact import load

    spec = meta[ENSEMBLE_KEY]
    members = [load(storage.join(folder, path), map_location).model for path in spec["members"]]
    model = EnsembleModel(members, spec["weights"]).to(map_location).eval()
    return model, from_dict(DataSpec, meta["data"], "data")


def copy_dir(src: str, dest: str) -> None:
    """Copy the folder `src` to `dest` (each local or a URI)."""
    src_fs, src_path = storage.resolve(src)
    dest_fs, dest_path = storage.resolve(dest)
    dest_fs.create_dir(dest_path, recursive=True)
    pafs.copy_files(src_path, dest_path, source_filesystem=src_fs, destination_filesystem=dest_fs)

