"""The synthetic catalogue: reproducible by seed, disjoint per task, labels consistent with inputs."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raymtl.config import ConfigError, load_experiment
from raymtl.data import synthetic
from raymtl.data.inspection import inspect_tasks
from raymtl.data.synthetic import DEFAULT_SIZES, DEMO_IMAGE_SIZE, make_catalogue, write_demo_config
from raymtl.data.tables import read_table

SMALL = {"color": 30, "pattern": 24, "season": 16, "style": 20}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    return make_catalogue(tmp_path_factory.mktemp("catalogue"), seed=0)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def frames(cat: dict[str, dict[str, str]]) -> dict[tuple[str, str], pd.DataFrame]:
    return {(task, split): read_table(path) for task, paths in cat.items() for split, path in paths.items()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    make_catalogue(tmp_path / "a", seed=1, sizes=SMALL)
    first = digests(tmp_path / "a")
    shutil.rmtree(tmp_path / "a")
    make_catalogue(tmp_path / "a", seed=1, sizes=SMALL)
    assert digests(tmp_path / "a") == first
    assert len(first) == sum(SMALL.values()) + 2 * len(SMALL)  # one PNG per item + 2 parquet per task

    make_catalogue(tmp_path / "b", seed=2, sizes=SMALL)
    other = digests(tmp_path / "b")
    assert other.keys() == first.keys()  # ids do not depend on the seed ...
    assert all(other[name] != digest for name, digest in first.items())  # ... but every file does


def test_layout_and_columns(catalogue: dict[str, dict[str, str]]) -> None:
    assert list(catalogue) == list(DEFAULT_SIZES)
    for task, paths in catalogue.items():
        out = Path(paths["train"]).parent
        assert paths == {"train": str(out / f"{task}_train.parquet"), "val": str(out / f"{task}_val.parquet")}
    for df in frames(catalogue).values():
        assert list(df.columns) == ["id", "image", "title", "label"]
        image = Path(df["image"].iloc[0])
        assert image.is_absolute() and image.parent.name == "images" and image.name == f"{df['id'].iloc[0]}.png"
        assert Image.open(image).size == (DEMO_IMAGE_SIZE,) * 2 and Image.open(image).mode == "RGB"


def test_sizes_and_disjoint_ids(catalogue: dict[str, dict[str, str]]) -> None:
    tables = frames(catalogue)
    for task, size in DEFAULT_SIZES.items():
        n_train, n_val = len(tables[task, "train"]), len(tables[task, "val"])
        assert n_train + n_val == size
        assert n_val == pytest.approx(0.2 * size, abs=2)
    ids = [i for df in tables.values() for i in df["id"]]
    assert len(ids) == len(set(ids)) == sum(DEFAULT_SIZES.values())


def named_colors(df: pd.DataFrame) -> list[tuple[set[str], str]]:
    return [(set(title.split()) & set(synthetic.COLORS), label) for title, label in zip(df["title"], df["label"])]


def test_labels_are_valid_and_follow_the_inputs(catalogue: dict[str, dict[str, str]]) -> None:
    tables = frames(catalogue)
    allowed = {"color": set(synthetic.COLORS), "pattern": set(synthetic.PATTERNS), "season": set(synthetic.SEASONS.values())}
    for (task, _), df in tables.items():
        if task in allowed:
            assert set(df["label"]) == allowed[task]  # every class present in every split at these sizes
    named = named_colors(tables["color", "train"])
    assert 0.6 * len(named) < sum(bool(colors) for colors, _ in named) < len(named)  # the title usually names it
    assert all(colors == {label} for colors, label in named if colors)
    for title, tags in zip(tables["style", "train"]["title"], tables["style", "train"]["label"]):
        expected = {tag for word in title.split() for tag in synthetic.STYLE_WORDS.get(word, ())}
        assert list(tags) == sorted(expected) and len(tags) > 0


def centre_pixels(path: str) -> np.ndarray:
    """The middle half of the image (always inside the swatch): float [pixels, 3]."""
    pixels = np.asarray(Image.open(path), dtype=np.float32)
    side = pixels.shape[0]
    return pixels[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4].reshape(-1, 3)


def test_images_show_the_color(catalogue: dict[str, dict[str, str]]) -> None:
    df = read_table(catalogue["color"]["train"]).head(60)
    for path, label in zip(df["image"], df["label"]):
        close = np.abs(centre_pixels(path) - synthetic.COLORS[label]).max(axis=1) < 60
        assert close.mean() > 0.5, (path, label)  # the pattern covers under half: the garment color dominates


def test_images_show_the_pattern(catalogue: dict[str, dict[str, str]]) -> None:
    """Each pattern covers its own share of the swatch: the signal a small network learns fast."""
    df = read_table(catalogue["pattern"]["train"]).head(120)
    shares: dict[str, list[float]] = {p: [] for p in synthetic.PATTERNS}
    for path, pattern in zip(df["image"], df["label"]):
        pixels = centre_pixels(path)
        off = np.abs(pixels - np.median(pixels, axis=0)).max(axis=1) > 60  # not the garment color
        shares[pattern].append(off.mean())
    mean = {p: np.mean(v) for p, v in shares.items()}
    assert max(shares["solid"]) < 0.02, shares["solid"]
    assert 0.05 < mean["dotted"] < mean["striped"] < mean["checked"] < 0.5, mean


def test_tiny_sizes_keep_validation_encodable(tmp_path: Path) -> None:
    cat = make_catalogue(tmp_path, seed=3, sizes={"color": 4, "style": 3}, val_fraction=0.5)
    tables = frames(cat)
    for task in cat:
        train_labels = {str(v) for cell in tables[task, "train"]["label"] for v in np.atleast_1d(cell)}
        val_labels = {str(v) for cell in tables[task, "val"]["label"] for v in np.atleast_1d(cell)}
        assert val_labels <= train_labels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"sizes": {"colour": 10}}, "unknown synthetic tasks"), ({"val_fraction": 1.0}, "val_fraction"),
     ({"sizes": {"color": 1}}, "at least 2 rows")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_catalogue(tmp_path, **kwargs)


def test_demo_config_loads_and_passes_inspection(tmp_path: Path, catalogue: dict[str, dict[str, str]]) -> None:
    path = write_demo_config(tmp_path, catalogue, tmp_path / "runs", training={"epochs": 1}, seed=5)
    exp = load_experiment(path)
    assert (exp.name, exp.seed, exp.storage_path) == ("demo", 5, str(tmp_path / "runs"))
    assert (exp.training.epochs, exp.training.batch_size, exp.training.lr) == (1, 32, 3e-3)
    assert exp.data.image_size == DEMO_IMAGE_SIZE
    assert [(v.name, v.crop) for v in exp.data.views] == [("full", 1.0), ("crop", 0.6)]
    assert exp.task("style").kind == "multilabel" and exp.task("color").image_column == "image"
    infos = inspect_tasks(exp)
    assert {name: info.n_train + info.n_val for name, info in infos.items()} == DEFAULT_SIZES
    assert infos["style"].labels == ["casual", "formal", "party", "sport"]
    tokenizer = synthetic.default_tokenizer_path()
    assert exp.data.tokenizer == tokenizer
    if tokenizer:  # the MiniLM tokenizer with a small random BERT sized to its vocabulary
        assert exp.model.text_encoder is None and exp.model.text_config["vocab_size"] == 30522
        assert exp.task("style").image_column is None and not infos["style"].has_image  # tags come from words
    assert all(info.has_text == (tokenizer is not None) for info in infos.values())


def test_demo_config_without_text_model_is_image_only(
    tmp_path: Path, catalogue: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthetic, "default_tokenizer_path", lambda: None)
    exp = load_experiment(write_demo_config(tmp_path, catalogue, tmp_path / "runs"))
    assert exp.model.text_config is None and all(t.text_column is None for t in exp.tasks)
    assert all(t.image_column == "image" for t in exp.tasks)
    assert not any(info.has_text for info in inspect_tasks(exp).values())


def test_demo_config_rejects_bad_override(tmp_path: Path, catalogue: dict[str, dict[str, str]]) -> None:
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        write_demo_config(tmp_path, catalogue, tmp_path / "runs", training={"batch_sise": 8})


def test_default_tokenizer_path(monkeypatch: pytest.MonkeyPatch) -> None:
    path = synthetic.default_tokenizer_path()
    if path is not None:
        assert (Path(path) / "tokenizer_config.json").is_file() and Path(path).name == "model"
    monkeypatch.setattr(synthetic.importlib.util, "find_spec", lambda name: None)
    assert synthetic.default_tokenizer_path() is None
