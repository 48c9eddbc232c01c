"""The self-describing saved model: one folder that `raymtl.load(path)` turns back into a model.

    raymtl_model.json   model spec, data spec (views, sizes, tokenizer), tasks with label maps,
                        task groups, the experiment it came from
    model.safetensors   the weights
    tokenizer/          the Hugging Face tokenizer, when the model reads text

No training config, data or network access is needed to load it: the text encoder is rebuilt from
its saved Hugging Face config, the image backbone from its torchvision name, and both take their
trained weights from the weights file (never from a hub or the models cache).
A folder written by `raymtl ensemble` loads the same way, its model an `EnsembleModel` (see
`raymtl.models.ensemble`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymtl.config import ConfigError, DataSpec, ModelSpec
from raymtl.convert import from_dict
from raymtl.data.task_info import TaskInfo

if TYPE_CHECKING:  # torch comes with save/load: `raymtl predict` checks a model folder without it
    import torch

    from raymtl.models.multitask import MultiTaskModel

META_FILE = "raymtl_model.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 3  # 2: model.fusion_norm; 3: model.modality_loss (see `_upgrade`)


@dataclass
class SavedModel:
    """A loaded model with everything prediction needs to preprocess inputs as in training."""

    model: MultiTaskModel  # or an EnsembleModel: same forward(batch, task) and infos
    data: DataSpec
    infos: dict[str, TaskInfo]
    groups: dict[str, list[str]]
    experiment: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return list(self.infos)

    @property
    def thresholds(self) -> dict[str, float]:
        return {name: info.threshold for name, info in self.infos.items()}


def portable_model_spec(model: MultiTaskModel) -> ModelSpec:
    """The model's own spec (a grown model's architecture is its base's, not its config's) without
    references to other files: the weights file holds every weight.

    The text encoder is described by its Hugging Face config (rebuilt by AutoConfig.for_model).
    """
    portable = dataclasses.replace(model.spec, text_encoder=None, image_weights=None, base=None, init_from=None,
                                   models_cache=None, groups=model.groups)
    if model.text_encoder is None:
        return portable
    return dataclasses.replace(portable, text_config=model.text_encoder.encoder.config.to_dict())


def save_model(
    folder: str | Path,
    model: MultiTaskModel,
    *,
    data: DataSpec,
    experiment: dict[str, Any],
) -> Path:
    """Write the model folder; its spec and tasks (label maps, thresholds) are the model's own."""
    from safetensors.torch import save_model as save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, str(folder / WEIGHTS_FILE))
    data_out = data
    if data.tokenizer and model.text_encoder is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(data.tokenizer).save_pretrained(folder / TOKENIZER_DIR)
        data_out = dataclasses.replace(data, tokenizer=TOKENIZER_DIR)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(portable_model_spec(model)),
        "data": dataclasses.asdict(data_out),
        "tasks": {name: info.to_dict() for name, info in model.infos.items()},
        "groups": model.groups,
        "experiment": experiment,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a raymtl model: {META_FILE} is missing")
    return json.loads(path.read_text())


def read_meta_at(location: str) -> dict[str, Any]:
    """`read_meta` of a local folder or a URI, without fetching the weights."""
    from raymtl import storage

    path = storage.join(location, META_FILE)
    if not storage.exists(path):
        raise ConfigError(f"{location} is not a raymtl model: {META_FILE} is missing")
    return json.loads(storage.read_text(path))


def load(folder: str | Path, map_location: str | torch.device = "cpu") -> SavedModel:
    """Rebuild a saved model (eval mode, on `map_location`) and its preprocessing spec from a model folder.

    A URI (s3://, gs://, ...) is copied into a temporary folder of its own on every call (so several
    loaders on one node, prediction actors, never write into each other's copy) and removed once
    the weights and the tokenizer are loaded: `load_tokenizer` keeps the tokenizer by its path.
    """
    import tempfile

    from raymtl import storage

    src = str(folder)
    if not storage.is_uri(src):
        return _load_local(Path(storage.resolve(src)[1]), map_location)
    with tempfile.TemporaryDirectory(prefix="raymtl_model_") as local:
        saved = _load_local(Path(storage.download_dir(src, local)), map_location)
        if saved.data.tokenizer and saved.data.tokenizer.startswith(local):  # the model's own
            from raymtl.data.transforms import load_tokenizer

            load_tokenizer(saved.data.tokenizer)
    return saved


def _load_local(folder: Path, map_location: str | torch.device) -> SavedModel:
    from safetensors.torch import load_model as load_safetensors

    from raymtl.models.ensemble import ENSEMBLE_KEY, load_members
    from raymtl.models.multitask import MultiTaskModel

    meta = read_meta(folder)
    if ENSEMBLE_KEY in meta:
        ensemble, data = load_members(str(folder), meta, map_location)
        return SavedModel(ensemble, _local_tokenizer(data, folder), ensemble.infos, {}, meta["experiment"])
    infos = {name: TaskInfo(**d) for name, d in meta["tasks"].items()}
    data = _local_tokenizer(from_dict(DataSpec, meta["data"], "data"), folder)
    spec = from_dict(ModelSpec, _upgrade(meta)["model"], "model")
    model = MultiTaskModel(spec, infos, [v.name for v in data.views], meta["groups"])
    load_safetensors(model, str(folder / WEIGHTS_FILE))
    model.to(map_location).eval()
    return SavedModel(model, data, model.infos, meta["groups"], meta["experiment"])


def _upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """An older model's meta as the current format, rebuilding the same modules and weight keys.

    Format 1 fused by plain concatenation (`fusion_norm: none`); formats 1 and 2 had no
    per-modality heads (`modality_loss: 0`)."""
    version = meta.get("format_version", 1)
    model = dict(meta["model"])
    if version < 2:
        model.setdefault("fusion_norm", "none")
    if version < 3:
        model.setdefault("modality_loss", 0.0)
    return {**meta, "model": model, "format_version": FORMAT_VERSION}


def _local_tokenizer(data: DataSpec, folder: Path) -> DataSpec:
    """`data` with the model folder's own tokenizer (saved as TOKENIZER_DIR) as a local path."""
    if data.tokenizer == TOKENIZER_DIR:
        data.tokenizer = str(folder / TOKENIZER_DIR)
    return data

