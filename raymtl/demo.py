"""`raymtl demo`: a synthetic catalogue, trained as one image+text multi-task model on Ray."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from raymtl.config import load_experiment
from raymtl.data.synthetic import make_catalogue, write_demo_config
from raymtl.train.trainer import TrainResult, fit, print_summary


def run_demo(out: str | Path = "demo_output", *, workers: int = 1, epochs: int | None = None,
             address: str | None = None) -> TrainResult:
    out = Path(out).resolve()
    print(f"[raymtl demo] generating a synthetic product catalogue under {out}/data ...", flush=True)
    catalogue = make_catalogue(out / "data", seed=0)
    config_path = write_demo_config(out / "data", catalogue, storage_path=str(out / "runs"))
    exp = load_experiment(config_path)
    training = dataclasses.replace(exp.training, num_workers=workers, epochs=epochs or exp.training.epochs)
    # A fresh run each time: the same name would resume the previous demo instead.
    exp = dataclasses.replace(exp, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", training=training)
    print(f"[raymtl demo] config: {config_path}; tasks: {', '.join(exp.task_names)}", flush=True)
    result = fit(exp, address=address)
    print_summary(result)
    return result
