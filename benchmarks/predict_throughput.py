"""Items/s of `raymtl.predict` against in-process loops: same saved model, same items, decoding included.

    python benchmarks/predict_throughput.py --items 400 --out predict_throughput.json

The model is the demo's architecture (ResNet-18 over two 64 px views, with the MiniLM tokenizer a
small BERT over titles, four tasks), built untrained: throughput does not depend on the weights.
Rows of the table:

- `in-process, per task`: the loop a user writes around `raymtl.load` (a `Preprocessor` and a
  forward pass per task, so each image is decoded once per image task);
- `in-process, predict stages`: predict's own decoding and model stages called in a loop, no Ray;
- `predict, in this process`: `predict(..., local=True)`, what it does by default for at most
  `LOCAL_ROWS` items: the same stages, the model loaded, one parquet file written, no Ray (the
  input is read before its clock starts: milliseconds here; the pipeline reads it inside its own);
- `predict pool=N`: the Ray Data pipeline (`predict`), on a local cluster, wall time from the first
  read to the last written file, actor start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import raymtl
from raymtl.config import Experiment, TaskSpec, load_experiment
from raymtl.data.synthetic import make_catalogue, write_demo_config
from raymtl.data.datasets import FOOTER_ACTORS_ENV
from raymtl.data.inspection import inspect_tasks
from raymtl.data.device_inputs import DeviceInputs
from raymtl.data.transforms import Preprocessor
from raymtl.models.artifact import save_model
from raymtl.models.build import build_model
from raymtl.predict import predict, stages_here
from raymtl.predict.plan import make_plan
from raymtl.ray_runtime import ensure_ray, release


def demo_model(root: Path, sizes: dict[str, int], image_size: int = 64,
               **overrides: Any) -> tuple[Experiment, str, dict[str, dict[str, str]]]:
    """(experiment, saved model folder, catalogue): the demo config (`overrides` merged into its
    sections) over a catalogue of `sizes` rows per task, its model built and saved untrained."""
    catalogue = make_catalogue(root / "data", seed=0, image_size=image_size, sizes=sizes)
    exp = load_experiment(write_demo_config(root / "data", catalogue, storage_path=str(root / "runs"), **overrides))
    folder = save_model(root / "model", build_model(exp, inspect_tasks(exp)), data=exp.data, experiment=exp.to_dict())
    return exp, str(folder), catalogue


def make_model(root: Path, items: int) -> tuple[str, str]:
    """(saved model folder, items parquet): the demo config's model over a catalogue of `items` items."""
    _, folder, catalogue = demo_model(root, {"color": items, "pattern": 40, "season": 40, "style": 40})
    table = pd.concat([pd.read_parquet(catalogue["color"][split]) for split in ("train", "val")], ignore_index=True)
    table.drop(columns="label").to_parquet(root / "items.parquet")
    return folder, str(root / "items.parquet")


def per_task_loop(model_dir: str, items: pd.DataFrame, batch_size: int) -> None:
    saved = raymtl.load(model_dir)
    columns = {t["name"]: t for t in saved.experiment["tasks"]}
    preps = {
        name: Preprocessor(TaskSpec(name, None, image_column=columns[name]["image_column"],
                                    text_column=columns[name]["text_column"]), info, saved.data, with_labels=False)
        for name, info in saved.infos.items()
    }
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items.iloc[start : start + batch_size]
            for name, prep in preps.items():
                batch = DeviceInputs(saved.data, "cpu")(prep(chunk))
                logits = saved.model(batch, name)
                (logits.softmax(1) if saved.infos[name].kind == "multiclass" else logits.sigmoid()).argmax(1)


def stages_loop(model_dir: str, items: pd.DataFrame, batch_size: int) -> None:
    for _ in stages_here(items, make_plan(model_dir, raymtl.load(model_dir)), batch_size):
        pass


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pools", default="1,2", help="comma-separated model actor pool sizes")
    parser.add_argument("--out", default="predict_throughput.json")
    args = parser.parse_args()

    import ray.data

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, items_file = make_model(root, args.items)
        items = pd.read_parquet(items_file)
        n = len(items)
        rows = [
            {"method": "in-process, per task", "seconds": timed(per_task_loop, model_dir, items, args.batch_size)},
            {"method": "in-process, predict stages", "seconds": timed(stages_loop, model_dir, items, args.batch_size)},
            {"method": "predict, in this process", "seconds": predict(
                model_dir, items_file, str(root / "out-local"), batch_size=args.batch_size, local=True).seconds},
        ]
        ensure_ray()  # the local cluster `raymtl predict` starts: one CPU slot per core, at least 4
        ray.data.DataContext.get_current().enable_progress_bars = False
        for pool in map(int, args.pools.split(",")):
            summary = predict(model_dir, items_file, str(root / f"out-{pool}"), batch_size=args.batch_size,
                              pool_size=pool, local=False)
            rows.append({"method": f"predict pool={pool}", "seconds": summary.seconds})
        release()
    for row in rows:
        row["items_per_s"] = n / row["seconds"]
    print(f"{n} items, batch size {args.batch_size}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"{'method':<30}{'seconds':>10}{'items/s':>10}")
    for row in rows:
        print(f"{row['method']:<30}{row['seconds']:>10.2f}{row['items_per_s']:>10.1f}")
    result = {"items": n, "batch_size": args.batch_size, "cpus": os.cpu_count(), "machine": platform.machine(),
              "torch_threads": torch.get_num_threads(), "footer_actors_env": os.environ.get(FOOTER_ACTORS_ENV),
              "load_1m_before": load_before,
              "load_1m_after": os.getloadavg()[0], "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
