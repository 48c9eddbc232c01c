"""Pretrained backbones by name: torchvision weights names and Hugging Face Hub ids resolve to files
fetched once (here: planted in temporary caches, in the layouts the libraries use; nothing downloads),
load bit for bit, train, and fail fast and in one line when missing offline.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision import models

from raymtl.config import ConfigError, load_experiment
from raymtl.data.synthetic import default_tokenizer_path
from raymtl.data.task_info import TaskInfo
from raymtl.models.hub import COMMON_BACKBONES, resolve_models

REPO = Path(__file__).resolve().parents[1]
MINILM = default_tokenizer_path()
HUB_ID = "raymtl-test/tiny-bert"
REVISION = "0123456789abcdef0123456789abcdef01234567"
needs_minilm = pytest.mark.skipif(MINILM is None, reason="the MiniLM package (its tokenizer) is not installed")


def save_torchvision_weights(torch_home: Path, arch: str, name: str = "DEFAULT") -> dict[str, torch.Tensor]:
    """Random weights for `arch` under the file name torchvision's weights entry downloads to."""
    url = models.get_model_weights(arch)[name].url
    torch.manual_seed(1)
    state = models.get_model(arch, weights=None).state_dict()
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / url.rsplit("/", 1)[-1])
    return state


def save_hub_repo(hub_cache: Path, repo_id: str = HUB_ID):
    """A tiny BERT and the MiniLM tokenizer as the main-revision snapshot of `repo_id` in a Hub cache."""
    from transformers import BertConfig, BertModel

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    vocab = len((Path(MINILM) / "vocab.txt").read_text().splitlines())
    torch.manual_seed(2)
    bert = BertModel(BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64))
    bert.save_pretrained(snapshot)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(MINILM) / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return bert, snapshot


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty standard torch/HF caches of this test, offline; returns (TORCH_HOME, HF hub cache)."""
    torch_home, hf_home = tmp_path / "torch_home", tmp_path / "hf_home"
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return torch_home, hf_home / "hub"


def experiment(tmp_path, **model):
    data = {"image_size": 32, "views": [{"name": "full"}, {"name": "crop", "crop": 0.6}]}
    if "tokenizer" in model:
        data["tokenizer"] = model.pop("tokenizer")
    return load_experiment({
        "name": "t", "storage_path": str(tmp_path / "runs"),
        "tasks": [{"name": "color", "train": "unused.parquet", "image_column": "image", "text_column": "title"}],
        "data": data, "model": model,
    })


def test_weights_name_resolves_to_the_torch_cache_and_loads_bit_for_bit(tmp_path, caches):
    from raymtl.models.backbones import ImageBackbone

    torch_home, _ = caches
    state = save_torchvision_weights(torch_home, "mobilenet_v3_small")
    entry = models.MobileNet_V3_Small_Weights.DEFAULT
    exp = experiment(tmp_path, image_backbone="mobilenet_v3_small", image_weights="DEFAULT")
    assert exp.data.mean is None
    resolved = resolve_models(exp)
    assert resolved.model.image_weights == str(torch_home / "hub" / "checkpoints" / entry.url.rsplit("/", 1)[-1])
    assert (resolved.data.mean, resolved.data.std) == (entry.transforms().mean, entry.transforms().std)
    explicit = dataclasses.replace(exp, data=dataclasses.replace(exp.data, mean=[0.5] * 3, std=[0.25] * 3))
    assert resolve_models(explicit).data.mean == [0.5] * 3  # the config's normalisation wins

    trunk = ImageBackbone("mobilenet_v3_small", ["full"], 8, weights=resolved.model.image_weights).trunk.state_dict()
    assert set(trunk) == {k for k in state if not k.startswith("classifier.3.")}  # the last Linear is removed
    assert all(torch.equal(trunk[k], state[k]) for k in trunk)


@needs_minilm
def test_hub_id_resolves_to_its_snapshot_and_loads_bit_for_bit(tmp_path, caches):
    from transformers import AutoTokenizer

    from raymtl.models.backbones import TextEncoder

    bert, snapshot = save_hub_repo(caches[1])
    resolved = resolve_models(experiment(tmp_path, image_backbone=None, text_encoder=HUB_ID, tokenizer=HUB_ID))
    assert resolved.model.text_encoder == resolved.data.tokenizer == str(snapshot)
    loaded = TextEncoder(resolved.model.text_encoder).encoder.state_dict()
    saved = bert.state_dict()
    assert loaded and all(torch.equal(v, saved[k]) for k, v in loaded.items())
    assert AutoTokenizer.from_pretrained(resolved.data.tokenizer)("a red dress")["input_ids"][0] == 101  # [CLS]


def test_models_cache_is_filled_from_the_standard_caches(tmp_path, caches):
    """A config's models_cache gets its own copy (what `raymtl pull --to` relies on): the run reads only it."""
    torch_home, _ = caches
    save_torchvision_weights(torch_home, "mobilenet_v3_small")
    exp = experiment(tmp_path, image_backbone="mobilenet_v3_small", image_weights="DEFAULT",
                     models_cache=str(tmp_path / "models"))
    path = Path(resolve_models(exp).model.image_weights)
    assert path.parent == tmp_path / "models" / "torch" / "hub" / "checkpoints" and path.is_file()
    shutil.rmtree(torch_home)
    assert resolve_models(exp).model.image_weights == str(path)


@pytest.mark.parametrize("source", ["uri", "standard cache"])
def test_a_copy_cut_short_leaves_nothing_in_the_cache(tmp_path, caches, monkeypatch, source):
    """Weights copied into the models cache appear there whole or not at all: the next run fetches again."""
    import pyarrow.fs

    torch_home, _ = caches
    if source == "uri":
        torch.save(models.mobilenet_v3_small().state_dict(), tmp_path / "w.pth")
        weights, copier = (tmp_path / "w.pth").as_uri(), (pyarrow.fs, "copy_files")
    else:
        save_torchvision_weights(torch_home, "mobilenet_v3_small")
        weights, copier = "DEFAULT", (shutil, "copyfile")
    exp = experiment(tmp_path, image_backbone="mobilenet_v3_small", image_weights=weights,
                     models_cache=str(tmp_path / "models"))
    real = getattr(*copier)

    def cut_short(src, dst, **kwargs):
        real(src, dst, **kwargs)
        Path(dst).write_bytes(Path(dst).read_bytes()[:1000])
        raise OSError("connection reset")

    monkeypatch.setattr(*copier, cut_short)
    with pytest.raises((ConfigError, OSError), match="connection reset"):
        resolve_models(exp)
    monkeypatch.setattr(*copier, real)
    path = Path(resolve_models(exp).model.image_weights)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_common_backbones_are_torchvision_models():
    """Naming one skips the driver's torchvision import, so each must really be a model here."""
    assert COMMON_BACKBONES <= set(models.list_models(module=models))


@pytest.mark.parametrize(
    "model, match",
    [
        ({"image_backbone": "mobilenet_v3_smal"}, "did you mean 'mobilenet_v3_small'"),
        ({"image_backbone": "resnet50", "image_weights": "IMAGENET1K_V3"}, "did you mean 'IMAGENET1K_V[12]'"),
        ({"image_backbone": None, "text_encoder": "/no/such/folder"}, "neither a local folder .* nor a Hugging Face"),
        ({"image_backbone": "resnet18", "image_weights": "no_such_weights.pt"}, "no_such_weights.pt' does not exist"),
    ],
)
def test_bad_model_names_are_config_errors(tmp_path, caches, model, match, monkeypatch):
    # Online: names are checked before anything downloads. (Offline with an empty torch cache, a
    # weights name is reported missing before torchvision is imported to check it.)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ConfigError, match=match):
        resolve_models(experiment(tmp_path, **model))


def test_named_weights_missing_offline_name_the_file_and_the_cache(tmp_path, caches):
    torch_home, _ = caches
    save_torchvision_weights(torch_home, "mobilenet_v3_small")  # a cache holding other weights
    with pytest.raises(ConfigError, match=r"resnet18 DEFAULT: resnet18-f37072fd.pth is not in the torch cache "
                                          rf"{torch_home}/hub/checkpoints .*raymtl pull"):
        resolve_models(experiment(tmp_path, image_backbone="resnet18", image_weights="DEFAULT"))


def test_weights_for_another_architecture_fail_before_training(tmp_path, caches):
    torch.save(models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ConfigError, match="r18.pt' does not (fit|match) this backbone"):
        resolve_models(experiment(tmp_path, image_backbone="resnet34", image_weights=str(tmp_path / "r18.pt")))


def test_unreadable_tokenizer_folder_names_the_file(tmp_path, caches):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="data.tokenizer: .*cannot read .*tokenizer_config.json"):
        resolve_models(experiment(tmp_path, image_backbone=None, tokenizer=str(tmp_path / "tok")))


@needs_minilm
def test_tokenizer_without_a_padding_token_fails_before_training_naming_the_text_tasks(tmp_path, caches):
    """raymtl pads every text to data.max_length: a GPT-2-like tokenizer failed in a decode task, after Ray started."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    with pytest.raises(ConfigError, match=r"data.tokenizer .*nopad.* has no padding token.* task\(s\) \['color'\]"):
        resolve_models(experiment(tmp_path, image_backbone=None, tokenizer=str(tmp_path / "nopad")))


@needs_minilm
@pytest.mark.parametrize("saved", [True, False], ids=["text_encoder", "text_config"])
def test_tokenizer_with_more_tokens_than_the_encoder_embeds_fails_before_training(tmp_path, caches, saved):
    """Token ids past the encoder's embedding table failed at the first text batch's forward pass."""
    from transformers import BertConfig, BertModel

    def encoder(vocab: int) -> dict:
        config = dict(model_type="bert", vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
        if not saved:
            return {"text_config": config}
        BertModel(BertConfig(**config)).save_pretrained(tmp_path / f"bert{vocab}")
        return {"text_encoder": str(tmp_path / f"bert{vocab}")}

    where = r"model.text_encoder .*bert100' \(its config.json vocab_size\)" if saved else r"model.text_config \(its vocab_size\)"
    with pytest.raises(ConfigError, match=rf"data.tokenizer .* has 30522 tokens but {where} embeds only 100"):
        resolve_models(experiment(tmp_path, image_backbone=None, tokenizer=MINILM, **encoder(100)))
    assert resolve_models(experiment(tmp_path, image_backbone=None, tokenizer=MINILM, **encoder(30522))).data.tokenizer


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "bret"}, "Unrecognized model identifier: bret"),
    ({"vocab_size": None}, "Validation error for field 'vocab_size': TypeError: Field 'vocab_size' expected int"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "The hidden size (30) is not a multiple of the number of attention"),
    ({"hidden_act": "nope"}, "nope"),
])
def test_a_text_config_transformers_cannot_build_is_a_config_error(tmp_path, caches, config, reason):
    """Each failed when a worker built the model (a bare ValueError or KeyError), or named no key."""
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    with pytest.raises(ConfigError, match=re.escape(f"model.text_config: transformers cannot build a model of it: ")
                       + ".*" + re.escape(reason)):
        resolve_models(experiment(tmp_path, image_backbone=None, text_config={**small, **config}))


@needs_minilm
def test_a_text_config_without_vocab_size_is_checked_at_its_default(tmp_path, caches):
    """BERT's default: 30522 embedding rows, which a tokenizer of 30525 tokens overruns."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    tok.add_tokens(["[SKU]", "[BRAND]", "[SIZE]"])
    tok.save_pretrained(tmp_path / "grown")
    small = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match=r"has 30525 tokens but model.text_config \(its vocab_size, by default\) "
                                          "embeds only 30522"):
        resolve_models(experiment(tmp_path, image_backbone=None, tokenizer=str(tmp_path / "grown"), text_config=small))


@pytest.mark.slow  # trains (~25 s each on 2 cores)
@pytest.mark.parametrize("arch, kwargs", [("mobilenet_v3_small", None), ("vit_b_16", {"image_size": 32})])
def test_non_resnet_backbones_train(arch, kwargs):
    """A MobileNet and a ViT (at 32 px: 2x2 patches of 16) build without their classifier and learn a batch."""
    from raymtl.config import ModelSpec
    from raymtl.models.multitask import MultiTaskModel

    torch.manual_seed(0)
    info = TaskInfo("color", "multiclass", ["a", "b", "c"], 8, 0, True, False)
    model = MultiTaskModel(ModelSpec(image_backbone=arch, image_kwargs=kwargs, hidden_dim=16, dropout=0.0),
                           {"color": info}, ["full", "crop"], {"all": ["color"]})
    batch = {"view_full": torch.randn(6, 3, 32, 32), "view_crop": torch.randn(6, 3, 32, 32),
             "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(batch, "color"), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_octopod_recipe_parses():
    exp = load_experiment(REPO / "jobs" / "configs" / "octopod_resnet50_bert.yaml")
    assert (exp.model.image_backbone, exp.model.image_weights) == ("resnet50", "IMAGENET1K_V2")
    assert exp.model.text_encoder == exp.data.tokenizer == "bert-base-uncased"
    assert [v.name for v in exp.data.views] == ["full", "crop"] and len(exp.task_groups()) == 2


# ---------------------------------------------------------------- through the command line


def cli(*args: str, env: dict[str, str], timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "XDG_CACHE_HOME", "RAY_ADDRESS")}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "raymtl.cli", *args], capture_output=True, text=True, check=False,
                          env={**base, "PYTHONPATH": str(REPO), **env}, timeout=timeout)
    return done, time.monotonic() - start


def cache_env(root: Path) -> dict[str, str]:
    return {"TORCH_HOME": str(root / "torch_home"), "HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1"}


def write_config(path: Path, tmp_path: Path, **model) -> Path:
    """A config whose data passes every pre-flight check, so only its models can fail."""
    from raymtl.data.synthetic import make_catalogue

    exp = experiment(tmp_path, **model).to_dict()
    exp["tasks"][0]["train"] = make_catalogue(tmp_path / "data", image_size=32, sizes={"color": 24})["color"]["train"]
    if exp["data"].get("tokenizer") is None:
        exp["data"]["tokenizer"] = model.get("text_encoder") or default_tokenizer_path()
    path.write_text(yaml.safe_dump(exp))
    return path


@pytest.mark.parametrize(
    "model, names",
    [
        ({"image_backbone": None, "text_encoder": "raymtl-test/absent-bert"}, ["raymtl-test/absent-bert", "hf_home"]),
        ({"image_backbone": "mobilenet_v3_small", "image_weights": "DEFAULT"}, ["mobilenet_v3_small", "torch_home"]),
    ],
)
def test_offline_missing_model_is_one_line_in_under_5s_without_ray(tmp_path, model, names):
    config = write_config(tmp_path / "c.yaml", tmp_path, **model)
    done, seconds = cli("train", str(config), env={**cache_env(tmp_path), "RAY_ADDRESS": "127.0.0.1:1"})  # Ray must not be reached
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert all(name in lines[0] for name in names) and "raymtl pull" in lines[0], lines[0]
    assert seconds < 5, f"took {seconds:.1f}s"


@pytest.mark.slow
@needs_minilm
@pytest.mark.timeout(600)
def test_pull_fills_a_folder_that_an_offline_run_trains_from(tmp_path):
    """`raymtl pull --to DIR` copies the named models out of this machine's caches; a run whose own
    caches are empty then trains from DIR offline, and its saved model loads without any cache."""
    from raymtl.data.synthetic import make_catalogue
    from raymtl.models.artifact import load, read_meta

    online = tmp_path / "online"
    save_torchvision_weights(online / "torch_home", "mobilenet_v3_small")
    save_hub_repo(online / "hf_home" / "hub")
    data = make_catalogue(tmp_path / "data", image_size=32, sizes={"color": 48})["color"]
    models_dir = tmp_path / "models"
    config = tmp_path / "pretrained.yaml"
    config.write_text(yaml.safe_dump({
        "name": "pretrained", "storage_path": str(tmp_path / "runs"),
        "tasks": [{"name": "color", "train": data["train"], "validation": data["val"], "image_column": "image",
                   "text_column": "title"}],
        "data": {"image_size": 32, "views": [{"name": "full"}, {"name": "crop", "crop": 0.6}],
                 "tokenizer": HUB_ID, "max_length": 16},
        "model": {"image_backbone": "mobilenet_v3_small", "image_weights": "DEFAULT", "text_encoder": HUB_ID,
                  "hidden_dim": 16, "models_cache": str(models_dir)},
        "training": {"epochs": 1, "batch_size": 16, "cpus_per_worker": 1},
    }))

    pulled, _ = cli("pull", str(config), "--to", str(models_dir), env=cache_env(online))
    assert pulled.returncode == 0, pulled.stderr
    assert f"model.text_encoder: {HUB_ID} -> {models_dir}" in pulled.stdout
    assert any((models_dir / "torch" / "hub" / "checkpoints").glob("mobilenet_v3_small-*.pth"))

    trained, _ = cli("train", str(config), env=cache_env(tmp_path / "empty"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = next((tmp_path / "runs" / "pretrained").glob("checkpoint_*"))
    meta = read_meta(checkpoint)
    assert meta["model"]["image_weights"] is None and meta["model"]["text_encoder"] is None
    assert meta["data"]["mean"] == list(models.MobileNet_V3_Small_Weights.DEFAULT.transforms().mean)
    shutil.rmtree(models_dir)  # the artifact holds every weight it trained
    assert load(checkpoint).model.text_encoder is not None
