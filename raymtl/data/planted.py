"""A synthetic benchmark with planted task clusters: ground truth for the task-grouping search.

Every image carries one latent score per cluster, a_c ~ N(0, 1), drawn along its own fixed, smooth
pixel pattern; the patterns are mutually orthogonal, plus pixel noise. A task in cluster c labels
its items 1[a_c + noise_task > 0]: tasks of one cluster read the same feature (they help each
other), tasks of different clusters read orthogonal ones, so the other clusters' features are
nuisance variation that a narrow shared backbone must make room for (they interfere). Each task has
its own disjoint items, as in real per-task datasets. Pure numpy: thousands of images in a second.

With `latents_per_cluster=k > 1` the clusters interfere destructively: a cluster owns k latents
and each of its tasks reads its own random direction w in them, 1[w . a_c + noise > 0]. Every
task sees the same kind of images, but the clusters need disjoint k-dimensional features: a
backbone whose shared representation is narrow (`model.hidden_dim` about k per cluster) cannot
hold both clusters' features, so all-in-one loses to one backbone per cluster
(`tests/test_interference.py` shows it with plain torch).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from raymtl.config import Experiment, load_experiment

LABEL_NOISE = 0.25  # std of the task-specific noise added to its cluster's latent before thresholding
PIXEL_NOISE = 0.5  # std of iid pixel noise, in units of one latent's pixel std
CONTRAST = 60.0  # pixel std in grey levels around mid-grey, whatever the number of clusters
_PATTERN_GRID = 4  # patterns are random on a 4x4 grid, upsampled: smooth blobs a small CNN can see


@dataclass
class PlantedTask:
    """One task's items: uint8 images [N, S, S, 3] and binary labels int64 [N]."""

    images: np.ndarray
    labels: np.ndarray


def resolve_clusters(
    clusters: Sequence[Sequence[str]] | None = None, n_clusters: int = 2, tasks_per_cluster: int = 2
) -> tuple[tuple[str, ...], ...]:
    """The planted partition: `clusters` as given, or n_clusters x tasks_per_cluster named c<k>_t<m>."""
    if clusters is None:
        clusters = [[f"c{c}_t{t}" for t in range(tasks_per_cluster)] for c in range(n_clusters)]
    planted = tuple(tuple(c) for c in clusters)
    names = [t for c in planted for t in c]
    if not names or any(not c for c in planted) or len(set(names)) != len(names):
        raise ValueError(f"clusters must be non-empty groups of distinct task names, got {clusters}")
    return planted


def planted_tasks(
    seed: int = 0,
    clusters: Sequence[Sequence[str]] | None = None,
    *,
    n_clusters: int = 2,
    tasks_per_cluster: int = 2,
    n_per_task: int = 256,
    image_size: int = 16,
    label_noise: float = LABEL_NOISE,
    pixel_noise: float = PIXEL_NOISE,
    latents_per_cluster: int = 1,
    n_test: int = 0,
) -> dict[str, PlantedTask]:
    """The benchmark in memory, deterministic in `seed`; tasks in cluster order.

    Each task has `n_per_task + n_test` items. The last `n_test` are drawn after every task's first
    `n_per_task`, so adding a test set leaves the other items as they were without it.
    """
    planted = resolve_clusters(clusters, n_clusters, tasks_per_cluster)
    rng = np.random.default_rng(seed)
    k = latents_per_cluster
    patterns = _patterns(rng, k * len(planted), image_size)
    tasks = [(c, task) for c, cluster in enumerate(planted) for task in cluster]
    directions, out = {}, {}
    for c, task in tasks:
        directions[task] = np.ones(1) if k == 1 else _unit(rng.standard_normal(k))
        out[task] = _items(rng, n_per_task, patterns, c, directions[task], image_size, label_noise, pixel_noise)
    for c, task in tasks if n_test else ():
        test = _items(rng, n_test, patterns, c, directions[task], image_size, label_noise, pixel_noise)
        out[task] = PlantedTask(np.concatenate([out[task].images, test.images]),
                                np.concatenate([out[task].labels, test.labels]))
    return out


def _items(
    rng: np.random.Generator, n: int, patterns: np.ndarray, cluster: int, direction: np.ndarray,
    image_size: int, label_noise: float, pixel_noise: float,
) -> PlantedTask:
    """n items of a task of `cluster` that reads `direction` in its cluster's latents."""
    n_latents, k = len(patterns), len(direction)
    latents = rng.standard_normal((n, n_latents))
    noise = rng.standard_normal((n, patterns.shape[1]))
    signal = (latents @ patterns + pixel_noise * noise) / np.sqrt(n_latents + pixel_noise**2)
    images = np.clip(128.0 + CONTRAST * signal, 0, 255).round().astype(np.uint8)
    read = latents[:, cluster * k:(cluster + 1) * k] @ direction
    labels = read + label_noise * rng.standard_normal(n) > 0
    return PlantedTask(images.reshape(n, image_size, image_size, 3), labels.astype(np.int64))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _patterns(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n orthogonal smooth pixel patterns [n, size*size*3], each with unit pixel std."""
    if n > min(size, _PATTERN_GRID) ** 2 * 3:
        raise ValueError(f"{n} latents need more distinct smooth patterns than {size}x{size} images hold")
    cells = -(-size // _PATTERN_GRID)
    coarse = rng.standard_normal((n, _PATTERN_GRID, _PATTERN_GRID, 3))
    fine = coarse.repeat(cells, axis=1).repeat(cells, axis=2)[:, :size, :size].reshape(n, -1)
    q, _ = np.linalg.qr(fine.T)  # orthonormal columns spanning the same smooth patterns
    return q.T * np.sqrt(fine.shape[1])


def make_planted(
    out_dir: str | Path,
    seed: int = 0,
    clusters: Sequence[Sequence[str]] | None = None,
    *,
    n_clusters: int = 2,
    tasks_per_cluster: int = 2,
    n_per_task: int = 256,
    image_size: int = 16,
    val_fraction: float = 0.2,
    latents_per_cluster: int = 1,
    n_test: int = 0,
) -> dict[str, dict[str, str]]:
    """Write the benchmark as PNGs plus per-task parquet tables (columns id, image, label).

    Returns {task: {"train": parquet path, "val": parquet path}}, plus "test" when `n_test` > 0:
    the last `val_fraction` of each task's `n_per_task` items is its validation split, and `n_test`
    further items its test split, held out from every choice made on validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir).resolve()
    tasks = planted_tasks(
        seed, clusters, n_clusters=n_clusters, tasks_per_cluster=tasks_per_cluster, n_per_task=n_per_task,
        image_size=image_size, latents_per_cluster=latents_per_cluster, n_test=n_test,
    )
    n_val = max(1, round(n_per_task * val_fraction))
    bounds = {"train": (0, n_per_task - n_val), "val": (n_per_task - n_val, n_per_task)}
    if n_test:
        bounds["test"] = (n_per_task, n_per_task + n_test)
    catalogue = {}
    for task, data in tasks.items():
        table = _write_images(out / "images" / task, task, data)
        catalogue[task] = {split: _write_table(table.iloc[a:b], out / task / f"{split}.parquet")
                           for split, (a, b) in bounds.items()}
    return catalogue


def _write_images(folder: Path, task: str, data: PlantedTask) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{task}-{k:05d}" for k in range(len(data.labels))]
    paths = [str(folder / f"{i}.png") for i in ids]
    for image, path in zip(data.images, paths):
        Image.fromarray(image).save(path)
    return pd.DataFrame({"id": ids, "image": paths, "label": data.labels})


def _write_table(table: pd.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.reset_index(drop=True).to_parquet(path, index=False)
    return str(path)


def planted_experiment(
    catalogue: Mapping[str, Mapping[str, str]], storage_path: str, **overrides: Any
) -> Experiment:
    """A small image-only, one-group experiment over `make_planted` output.

    `overrides` are config keys merged into the defaults, nested sections as dicts, e.g.
    `training={"epochs": 5}`, `model={"groups": {...}}`; the result is validated like a YAML file.
    """
    config: dict[str, Any] = {
        "name": "planted",
        "storage_path": storage_path,
        "tasks": [
            {"name": task, "train": paths["train"], "validation": paths["val"], "test": paths.get("test"),
             "image_column": "image", "id_column": "id", "labels": [0, 1]}
            for task, paths in catalogue.items()
        ],
        "data": {"image_size": 16, "views": [{"name": "full"}]},
        # narrow on purpose: the clusters have to compete for a few shared features
        "model": {"image_backbone": "resnet18", "hidden_dim": 32, "dropout": 0.0},
        "training": {
            "epochs": 3, "batch_size": 16, "eval_batch_size": 64, "lr": 1e-3, "mixed_precision": False,
        },
    }
    return load_experiment(_merge(config, overrides))


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested dicts merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
