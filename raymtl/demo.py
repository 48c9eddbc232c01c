"""`raymtl demo`: a synthetic catalogue, trained as one image+text multi-task model on Ray."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from raymtl import console
from raymtl.config import load_experiment
from raymtl.data.synthetic import make_catalogue, write_demo_config
from raymtl.train.trainer import TrainResult, fit, print_summary


def run_demo(out: str | Path = "demo_output", *, workers: int = 1, epochs: int | None = None,
             address: str | None = None) -> TrainResult:
    out = Path(out).resolve()
    console.say(f"[raymtl demo] generating a synthetic product catalogue under {out}/data ...")
    catalogue = make_catalogue(out / "data", seed=0)
    config_path = write_demo_config(out / "data", catalogue, storage_path=str(out / "runs"))
    exp = load_experiment(config_path)
    training = dataclasses.replace(exp.training, num_workers=workers,
                                   epochs=exp.training.epochs if epochs is None else epochs)
    # A fresh run each time: the same name would resume the previous demo instead.
    exp = dataclasses.replace(exp, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", training=training).validate()
    console.say(f"[raymtl demo] config: {config_path}; tasks: {', '.join(exp.task_names)}")
    console.open_log(str(out / "runs" / exp.name))
    result = fit(exp, address=address)
    print_summary(result)
    console.say(next_steps(exp, result, out))
    return result


def next_steps(exp, result: TrainResult, out: Path) -> str:
    """What was trained, where it is, and the command to try it on new items."""
    m = exp.model
    parts = [m.image_backbone or "no image tower", "a small BERT" if m.text_config else m.text_encoder]
    model = result.best_checkpoint or result.checkpoint
    return "\n".join([
        f"\n[raymtl demo] trained one {' + '.join(p for p in parts if p)} model on {len(exp.tasks)} tasks "
        f"({', '.join(f'{t.name} ({t.kind})' for t in exp.tasks)}), each from its own table.",
        f"  model:       {model}",
        f"  tensorboard: tensorboard --logdir {result.run_dir}/tensorboard",
        f"  try next:    raymtl predict {model} {out}/data/{exp.tasks[0].name}_val.parquet {out}/predictions",
    ])
