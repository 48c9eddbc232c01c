"""Named pretrained models, resolved to local files once, on the driver, before Ray starts.

A config may name models instead of giving files: `model.image_weights: DEFAULT` (torchvision's
weights for `model.image_backbone`), `model.text_encoder` / `data.tokenizer: bert-base-uncased` (a
Hugging Face Hub id). `resolve_models` finds each one in the models cache, fetching what is missing,
and returns the experiment with local paths in their place: workers only ever read those files, so
every rank, node and resumed run starts from the same weights, and no worker reaches a hub.

The cache is `model.models_cache` (a folder every node sees) or, when unset, the standard torch and
Hugging Face caches of this machine. It uses those libraries' own layouts, so a folder filled by
`raymtl pull --to DIR` also serves as `TORCH_HOME=DIR/torch` and `HF_HUB_CACHE=DIR/huggingface/hub`.
With `HF_HUB_OFFLINE=1` nothing is downloaded: a missing model is an error naming where it looked.

Only an image backbone makes this module import torchvision (seconds); a missing text model, or
named image weights on an offline machine whose torch caches are empty, is reported in well under
a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from raymtl import storage
from raymtl.config import ConfigError, Experiment, ModelSpec, _choice

TORCH_SUBDIR = Path("torch", "hub", "checkpoints")
HF_SUBDIR = Path("huggingface", "hub")
WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # torchvision weights enum members: DEFAULT, IMAGENET1K_V2...
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
TEXT_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]  # configs, vocabularies, tokenizers
FETCH_HINT = "fetch it with `raymtl pull CONFIG` on a machine with network (`--to DIR`, then model.models_cache: DIR)"


@dataclasses.dataclass(frozen=True)
class Caches:
    """Where fetched models live: torchvision checkpoints and Hugging Face Hub repos."""

    torch: Path
    hf: Path

    @classmethod
    def of(cls, models_cache: str | None) -> Caches:
        if models_cache is None:
            return standard_caches()
        if storage.is_uri(models_cache):
            raise ConfigError(f"model.models_cache: {models_cache!r} must be a folder every node sees, not a URI")
        root = Path(models_cache).expanduser().resolve()
        return cls(root / TORCH_SUBDIR, root / HF_SUBDIR)


def standard_caches() -> Caches:
    """torch's and huggingface_hub's default caches, by their rules (TORCH_HOME, HF_HOME, HF_HUB_CACHE)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
    torch_home = Path(os.environ.get("TORCH_HOME", xdg / "torch"))
    hf_home = Path(os.environ.get("HF_HOME", xdg / "huggingface"))
    hf = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    return Caches((torch_home / "hub" / "checkpoints").expanduser(), hf.expanduser())


def offline() -> bool:
    """`HF_HUB_OFFLINE=1` forbids every download, torchvision's too (cluster jobs set it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_models(exp: Experiment) -> Experiment:
    """`exp` with every named model replaced by its local files, fetched into the cache if missing.

    Also checks that local files and folders exist and are readable. The image weights' own
    normalisation becomes `data.mean`/`std` unless the config sets them. Errors are one line naming
    the model, where it looked and how to fetch it. Text models come first: they need no torch. After
    every named model is found, a `model.text_config` is built on the meta device and a text task's
    tokenizer loaded (transformers, seconds), to check that it pads and that its ids fit the encoder's
    embeddings.
    """
    m, d = exp.model, exp.data
    caches = Caches.of(m.models_cache)
    text_encoder = m.text_encoder and _text_model(m.text_encoder, "model.text_encoder", caches, weights=True)
    tokenizer = d.tokenizer and _text_model(d.tokenizer, "data.tokenizer", caches, weights=False)
    image_weights, mean, std = m.image_weights, d.mean, d.std
    if m.image_backbone is not None:
        image_weights, norm = _image_weights(m.image_backbone, m.image_weights, m.image_kwargs, caches)
        if norm and mean is None and std is None:
            mean, std = norm
    text_tasks = [t.name for t in exp.tasks if t.text_column is not None]
    vocab = _encoder_vocab(m, text_encoder)  # builds a text_config's model: a bad one fails here
    if tokenizer and text_tasks:
        _check_tokenizer(d.tokenizer, tokenizer, text_tasks, vocab)
    return dataclasses.replace(
        exp,
        model=dataclasses.replace(m, text_encoder=text_encoder, image_weights=image_weights),
        data=dataclasses.replace(d, tokenizer=tokenizer, mean=mean, std=std),
    )


def pull(exp: Experiment) -> list[str]:
    """Fetch every model `exp` names into its cache; one line per model saying where it is."""
    done = resolve_models(exp)
    pairs = [
        ("model.image_weights", exp.model.image_weights, done.model.image_weights),
        ("model.text_encoder", exp.model.text_encoder, done.model.text_encoder),
        ("data.tokenizer", exp.data.tokenizer, done.data.tokenizer),
    ]
    return [f"{key}: {name} -> {path}" for key, name, path in pairs if name is not None]


# ---------------------------------------------------------------- Hugging Face models


def _text_model(name: str, key: str, caches: Caches, *, weights: bool) -> str:
    """A local folder for a Hub id or folder: the text encoder (`weights`) or a tokenizer."""
    local = Path(name).expanduser()
    if local.exists() or not HUB_ID.fullmatch(name):
        if storage.is_uri(name):
            raise ConfigError(f"{key}: {name!r}: give a local folder or a Hugging Face Hub id, not a URI")
        _check_text_folder(local, key, name, weights=weights)
        return str(local.resolve())
    found = _hf_snapshot(caches.hf, name)
    if not _complete(found, weights=weights):
        standard = standard_caches().hf
        if standard != caches.hf and _complete(_hf_snapshot(standard, name), weights=weights):
            _copy_repo(standard, caches.hf, name)
        elif not offline():
            _hf_download(name, key, caches.hf, weights=weights)
        else:
            raise ConfigError(f"{key}: {name!r} is no local folder and not in the Hugging Face cache {caches.hf} "
                              f"(HF_HUB_OFFLINE is set); {FETCH_HINT}")
        found = _hf_snapshot(caches.hf, name)
    if not _complete(found, weights=weights):
        raise ConfigError(f"{key}: {name!r}: {caches.hf} holds no complete copy of it "
                          f"(config or {'weights' if weights else 'tokenizer'} files missing); {FETCH_HINT}")
    _check_text_folder(found, key, name, weights=weights)
    return str(found)


def _hf_snapshot(cache: Path, repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id`'s main revision in a Hub cache, if there is one."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    snapshot = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else "-")
    return snapshot if snapshot.is_dir() else None


def _complete(folder: Path | None, *, weights: bool) -> bool:
    if folder is None:
        return False
    if weights:
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
        return (folder / "config.json").is_file() and has_weights
    return any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))


def _check_text_folder(folder: Path, key: str, name: str, *, weights: bool) -> None:
    """The folder exists, and the file transformers reads first parses (a cheap readability check)."""
    if not folder.is_dir():
        raise ConfigError(f"{key}: {name!r} is neither a local folder ({folder.resolve()} does not exist) "
                          "nor a Hugging Face Hub id")
    first = "config.json" if weights else next(
        (f for f in ("tokenizer_config.json", "tokenizer.json") if (folder / f).is_file()), "tokenizer_config.json")
    try:
        json.loads((folder / first).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {name!r}: cannot read {folder / first} ({type(e).__name__}: {e})") from None


def _encoder_vocab(model: ModelSpec, encoder: str | None) -> tuple[str, int] | None:
    """Where the text encoder's embedding rows are set, and how many: its config.json, or
    `model.text_config` (its model type's default when it sets none, as `TextEncoder` builds it)."""
    if encoder:
        vocab = json.loads((Path(encoder) / "config.json").read_text()).get("vocab_size")
        where = f"model.text_encoder {model.text_encoder!r} (its config.json vocab_size)"
    elif model.text_config is not None:
        vocab = _text_config_vocab(model.text_config)
        where = "model.text_config (its vocab_size" + ("" if "vocab_size" in model.text_config else ", by default") + ")"
    else:
        return None
    return (where, vocab) if isinstance(vocab, int) else None


def _text_config_vocab(text_config: dict) -> int | None:
    """The embedding rows of the encoder `model.text_config` makes, its model type's default when unset.

    The model is built once on the meta device (no memory), as `TextEncoder` builds it: a config
    transformers reads but cannot build a model of (heads that do not divide the hidden size, an
    unknown activation) fails here, naming the key, rather than in every worker."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = dict(text_config)
    try:
        built = AutoConfig.for_model(config.pop("model_type", "bert"), **config)
        with torch.device("meta"):
            AutoModel.from_config(built)
    except Exception as e:  # transformers' own (ValueError, KeyError, its strict-dataclass errors): the config's
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"model.text_config: transformers cannot build a model of it: {reason[:300]}") from None
    return getattr(built, "vocab_size", None)


def _check_tokenizer(name: str, folder: str, tasks: list[str], encoder_vocab: tuple[str, int] | None) -> None:
    """The tokenizer pads (every text is padded to `data.max_length`) and its ids fit the encoder's
    embedding table: either fault would otherwise surface in a decode task or a text batch's forward
    pass, after Ray started. Loads the tokenizer once per process, as the decode workers do."""
    from raymtl.data.transforms import load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer {name!r}: transformers cannot load {folder} "
                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        raise ConfigError(f"data.tokenizer {name!r} has no padding token, and raymtl pads the text of task(s) "
                          f"{tasks} to data.max_length; use a tokenizer with one (BERT's [PAD]) or set pad_token "
                          f"in its tokenizer_config.json")
    if encoder_vocab is not None and len(tokenizer) > encoder_vocab[1]:
        where, vocab = encoder_vocab
        raise ConfigError(f"data.tokenizer {name!r} has {len(tokenizer)} tokens but {where} embeds only {vocab}: "
                          "token ids past it cannot be looked up; use the encoder's own tokenizer")


def _copy_repo(source: Path, target: Path, repo_id: str) -> None:
    """Copy one repo (blobs, snapshot links, refs) between Hub caches: relative links stay valid."""
    folder = f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source / folder, target / folder, symlinks=True, dirs_exist_ok=True)


def _hf_download(repo_id: str, key: str, cache: Path, *, weights: bool) -> None:
    """Download the files transformers needs (safetensors weights if the repo has them, else .bin)."""
    from huggingface_hub import snapshot_download

    print(f"[raymtl] fetching {repo_id} ({key}) into {cache}", flush=True)
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache,
                                        allow_patterns=TEXT_FILES + (["*.safetensors"] if weights else [])))
        if weights and not _complete(folder, weights=True):
            snapshot_download(repo_id, cache_dir=cache, allow_patterns=["pytorch_model*.bin"])
    except Exception as e:
        raise ConfigError(f"{key}: could not fetch {repo_id!r} into {cache} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {FETCH_HINT}") from None


# ---------------------------------------------------------------- torchvision weights


# Classification models every torchvision raymtl supports has (a test holds this to `list_models`):
# naming one costs the driver no torchvision import (seconds of start-up); other names are looked up.
COMMON_BACKBONES = frozenset({
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s",
    "convnext_tiny", "convnext_small", "convnext_base", "mobilenet_v3_small", "mobilenet_v3_large",
    "regnet_y_400mf", "regnet_y_800mf", "densenet121", "vit_b_16",
})


def check_image_backbone(arch: str) -> None:
    """`arch` is a torchvision classification model, else a ConfigError with a "did you mean"."""
    if arch in COMMON_BACKBONES:
        return
    from torchvision import models

    _choice(arch, models.list_models(module=models), "model.image_backbone",
            listed="the names of torchvision.models.list_models(module=torchvision.models)")


def _image_weights(arch: str, weights: str | None, kwargs: dict | None,
                   caches: Caches) -> tuple[str | None, tuple[list[float], list[float]] | None]:
    """(local weights file or None, the named weights' (mean, std) or None); checks the backbone name."""
    named = weights is not None and WEIGHTS_NAME.fullmatch(weights) and not Path(weights).exists()
    if named and offline() and not (_any_checkpoint(caches.torch) or _any_checkpoint(standard_caches().torch)):
        # The common offline miss (a fresh node), told without the seconds that importing torchvision takes.
        raise ConfigError(f"model.image_weights: {arch} {weights}: no torchvision weights in the torch cache "
                          f"{caches.torch} (HF_HUB_OFFLINE is set); {FETCH_HINT}")
    check_image_backbone(arch)
    if weights is None:
        return None, None
    from torchvision import models

    from raymtl.models.backbones import check_image_weights

    local = Path(weights).expanduser()
    if storage.is_uri(weights):
        path = _fetch_uri(weights, caches.torch)
        norm = None
    elif local.exists() or not WEIGHTS_NAME.fullmatch(weights):
        path, norm = local, None
    else:
        enum = models.get_model_weights(arch)
        _choice(weights, list(enum.__members__), f"model.image_weights (for {arch})")
        entry = enum[weights]
        path = _fetch_torchvision(entry.url, f"{arch} {weights}", caches.torch)
        preset = entry.transforms()
        norm = (list(preset.mean), list(preset.std))
    try:
        check_image_weights(arch, str(path), kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.image_weights: {e}") from None
    return str(path.resolve()), norm


def _any_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.pth"))


def _fetch_torchvision(url: str, what: str, cache: Path) -> Path:
    file = cache / url.rsplit("/", 1)[-1]
    if file.is_file():
        return file
    standard = standard_caches().torch / file.name
    if standard.is_file():
        _write_in_place(file, lambda part: shutil.copyfile(standard, part))
        return file
    if offline():
        raise ConfigError(f"model.image_weights: {what}: {file.name} is not in the torch cache {cache} "
                          f"(HF_HUB_OFFLINE is set); {FETCH_HINT}")
    from torch.hub import download_url_to_file

    print(f"[raymtl] fetching {what} into {cache}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(file), progress=True)
    except Exception as e:
        raise ConfigError(f"model.image_weights: could not fetch {what} from {url} ({type(e).__name__}: {e}); "
                          f"{FETCH_HINT}") from None
    return file


def _fetch_uri(uri: str, cache: Path) -> Path:
    """A weights file at a URI, copied once into the cache (keyed by the URI) so workers read it locally."""
    import hashlib

    import pyarrow.fs as pafs

    file = cache / "uri" / hashlib.sha256(uri.encode()).hexdigest()[:16] / uri.rsplit("/", 1)[-1]
    if file.is_file():
        return file
    fs, path = storage.resolve(uri)
    try:
        _write_in_place(file, lambda part: pafs.copy_files(path, str(part), source_filesystem=fs,
                                                           destination_filesystem=pafs.LocalFileSystem()))
    except Exception as e:
        raise ConfigError(f"model.image_weights: could not copy {uri} ({type(e).__name__}: {e})") from None
    return file


def _write_in_place(file: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `file`, then rename it to `file`: the cache takes any file there as
    complete, so a copy cut short must never leave one under that name."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=file.parent)
    os.close(fd)
    part = Path(name)
    try:
        write(part)
        os.replace(part, file)
    finally:
        part.unlink(missing_ok=True)
