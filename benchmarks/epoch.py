"""Whole epochs of raymtl against a bare PyTorch process that pays nothing for Ray.

    python -m benchmarks.epoch --reps 3 --json epoch.json

Three modes, each a fresh subprocess (a command, as a user would start one):

  raymtl          `raymtl.train.trainer.fit`, 1 worker with all the CPUs: by default a local
                  1-worker run trains in the command's own process (`training.in_process`)
  raymtl_workers  the same on Ray Train's workers (`in_process: never`): its own local Ray
                  cluster, a Train controller and one worker actor
  bare            a plain PyTorch loop, no Ray imported
  plain_ray       the same plain loop with a local Ray cluster alive, started as raymtl starts
                  one (`raymtl.ray_runtime.ensure_ray`): what Ray's background processes alone cost

Every mode trains the same `build_model` MultiTaskModel on the same synthetic catalogue tasks
(color, pattern, season; images only) with the same schedule (`TaskSchedule`, shuffled), loss,
AdamW and `zero_grad(set_to_none=True)`; the plain loop decodes its inputs once up front, as
raymtl's `data.cache` does. An epoch is its steps, the evaluation of every task's validation rows
and a checkpoint (the model folder + the optimizer state, as raymtl writes them).

Models: `resnet50` (full image + centre crop 0.6, 64 px) and `resnet18` (one view, 32 px), batch
32. Reps run interleaved (each rep runs every model and mode, the mode order rotated per rep), with
the 1-minute load average read before and after each run. Per run: start-up (command -> end of the
first step), each epoch's seconds, peak summed PSS of the command's process tree (for raymtl: the
driver and every Ray process it started), the torch threads it computed with.

raymtl's marks come from its run: the first step from the loop's `perf/first_step_unix` (rank 0),
epoch ends from the checkpoint folders' modification times (each written after the epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.proc_tree import descendants, pss_by_title

TASKS = ("color", "pattern", "season")
MODES = ("raymtl", "raymtl_workers", "bare", "plain_ray")
RAYMTL_MODES = {"raymtl": "auto", "raymtl_workers": "never"}  # mode -> training.in_process
MODELS = {  # name -> (backbone, views, image size)
    "resnet50": ("resnet50", [{"name": "full"}, {"name": "crop", "crop": 0.6}], 64),
    "resnet18": ("resnet18", [{"name": "full"}], 32),
}
DEFAULT_STEPS = {"resnet50": 9, "resnet18": 36}  # per epoch: ~13 s and ~7 s on 2 cores
BATCH, VAL_ROWS = 32, 32
TARGET_RATIO, TARGET_STARTUP_S, TARGET_PSS_MB = 1.05, 20.0, 2.5 * 1024


@dataclass
class Run:
    model: str
    mode: str
    rep: int
    startup_s: float  # command started -> end of the first step
    epochs_s: list[float]  # epoch 1 from the end of its first step; then whole epochs
    eval_s: list[float] = field(default_factory=list)
    checkpoint_s: list[float] = field(default_factory=list)  # measured in the plain modes only
    wall_s: float = 0.0
    peak_pss_mb: float = 0.0
    peak_pss_by_process: dict[str, float] = field(default_factory=dict)  # MB per process title, at the peak
    torch_threads: int = 0
    load_before: float = 0.0
    load_after: float = 0.0

    @property
    def steady_s(self) -> float:
        return statistics.median(self.epochs_s[1:] or self.epochs_s)


# ---------------------------------------------------------------- data and experiment


def write_data(root: Path, model: str, steps: int) -> dict[str, dict[str, str]]:
    """`steps / 3` train batches and VAL_ROWS validation rows per task, at the model's image size."""
    from raymtl.data.synthetic import make_catalogue

    rows = steps // len(TASKS) * BATCH + VAL_ROWS
    return make_catalogue(root / model, seed=0, image_size=MODELS[model][2], sizes=dict.fromkeys(TASKS, rows),
                          val_fraction=VAL_ROWS / rows)


def experiment(name: str, model: str, paths: dict[str, dict[str, str]], epochs: int, storage: Path,
               in_process: str = "auto"):
    from raymtl.config import DataSpec, Experiment, ModelSpec, TaskSpec, TrainingSpec, ViewSpec

    backbone, views, size = MODELS[model]
    return Experiment(
        name=name,
        tasks=[TaskSpec(name=t, train=p["train"], validation=p["val"], image_column="image") for t, p in paths.items()],
        storage_path=str(storage),
        data=DataSpec(image_size=size, views=[ViewSpec(**v) for v in views]),
        model=ModelSpec(image_backbone=backbone, hidden_dim=256),
        training=TrainingSpec(epochs=epochs, batch_size=BATCH, optimizer="adamw", num_workers=1,
                              cpus_per_worker=float(os.cpu_count() or 1), keep_checkpoints=epochs,
                              in_process=in_process),
    ).validate()


# ---------------------------------------------------------------- the child processes


def plain_child(exp, with_ray: bool) -> dict:
    """The plain loop; returns its marks (unix times) and per-epoch evaluation/checkpoint seconds."""
    import pandas as pd
    import torch

    from raymtl.data.schedule import TaskSchedule
    from raymtl.data.inspection import inspect_tasks
    from raymtl.data.device_inputs import DeviceInputs
    from raymtl.data.transforms import Preprocessor
    from raymtl.models.artifact import save_model
    from raymtl.models.build import build_model
    from raymtl.train.batches import batches_per_epoch
    from raymtl.train.losses import task_loss
    from raymtl.train.metrics import make_accumulator
    from raymtl.train.optim import build_optimizer

    if with_ray:
        from raymtl.ray_runtime import ensure_ray

        ensure_ray()
    tr = exp.training
    infos = inspect_tasks(exp)

    def decode(task, split: str) -> dict[str, torch.Tensor]:
        out = Preprocessor(task, infos[task.name], exp.data)(pd.read_parquet(getattr(task, split)))
        return DeviceInputs(exp.data, "cpu")(out)

    train = {t.name: decode(t, "train") for t in exp.tasks}
    val = {t.name: decode(t, "validation") for t in exp.tasks}
    model = build_model(exp, infos).train()
    optimizer = build_optimizer(model, tr, tr.lr)
    losses = {t.name: task_loss(t, infos[t.name]) for t in exp.tasks}
    batches = batches_per_epoch(infos, tr.batch_size, 1)
    rng = torch.Generator().manual_seed(exp.seed)
    marks: dict = {"first_step": None, "epoch_end": [], "eval_s": [], "checkpoint_s": []}
    for epoch in range(tr.epochs):
        order = {t: iter(torch.randperm(len(d["label"]), generator=rng).split(tr.batch_size)) for t, d in train.items()}
        for task in TaskSchedule(batches, exp.seed, epoch, tr.sampler, tr.temperature).steps():
            idx = next(order[task])
            batch = {k: v[idx] for k, v in train[task].items()}
            logits = model(batch, task=task)
            loss = losses[task](logits.float(), batch["label"]) * infos[task].weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the loop's EWMA reads the loss every step
            marks["first_step"] = marks["first_step"] or time.time()
        start = time.perf_counter()
        evaluate(model, val, infos, losses, tr.eval_batch_size, make_accumulator)
        marks["eval_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            save_model(tmp, model, data=exp.data, experiment=exp.to_dict())
            torch.save({"optimizer": optimizer.state_dict()}, Path(tmp) / "train_state.pt")
        marks["checkpoint_s"].append(time.perf_counter() - start)
        marks["epoch_end"].append(time.time())
    marks["torch_threads"] = torch.get_num_threads()
    return marks


def evaluate(model, val, infos, losses, batch_size: int, make_accumulator) -> None:
    """As raymtl's `evaluate`: per task, metric states over its validation batches, then computed."""
    import torch

    from raymtl.models.ensemble import probabilities

    model.eval()
    with torch.no_grad():
        for task, data in val.items():
            acc = make_accumulator(infos[task])
            for i in range(0, len(data["label"]), batch_size):
                batch = {k: v[i : i + batch_size] for k, v in data.items()}
                logits = model(batch, task).float()
                probs = probabilities(logits, infos[task].kind)
                acc.update(probs, batch["label"], losses[task](logits, batch["label"]).item() * len(logits))
            acc.compute()
    model.train()


def raymtl_child(exp) -> dict:
    """`fit`, then its marks: the first step from the loop's own `perf/first_step_unix`, epoch ends
    from the checkpoint folders (each written after its epoch)."""
    from raymtl.train.trainer import fit

    import torch

    result = fit(exp)
    ends = sorted(p.stat().st_mtime for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())
    here = exp.training.in_process != "never"
    return {
        "first_step": result.history[0]["perf/first_step_unix"],
        "epoch_end": ends,
        "eval_s": [row["perf/eval_s"] for row in result.history],
        "checkpoint_s": [],
        "torch_threads": torch.get_num_threads() if here else worker_threads(exp.training.cpus_per_worker),
    }


def worker_threads(cpus: float) -> int:
    """torch.get_num_threads() in a fresh Ray actor holding `cpus` CPUs, as the Train worker was."""
    import ray
    import torch

    @ray.remote
    class Probe:
        def threads(self) -> int:
            return torch.get_num_threads()

    probe = Probe.options(num_cpus=cpus).remote()
    try:
        return ray.get(probe.threads.remote())
    finally:
        ray.kill(probe)


def child_main(mode: str, spec: Path) -> None:
    args = json.loads(spec.read_text())
    exp = experiment(args["name"], args["model"], args["paths"], args["epochs"], Path(args["storage"]),
                     RAYMTL_MODES.get(mode, "auto"))
    marks = raymtl_child(exp) if mode in RAYMTL_MODES else plain_child(exp, with_ray=mode == "plain_ray")
    Path(args["out"]).write_text(json.dumps(marks))


# ---------------------------------------------------------------- the parent


def run_child(mode: str, model: str, rep: int, paths: dict, args: argparse.Namespace, work: Path) -> Run:
    out = work / f"{model}-{mode}-{rep}.json"
    spec = work / f"{model}-{mode}-{rep}.spec.json"
    spec.write_text(json.dumps({"name": f"{model}-{mode}-{rep}-{time.time_ns()}", "model": model, "paths": paths,
                                "epochs": args.epochs, "storage": str(work / "runs"), "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    load_before = os.getloadavg()[0]
    start = time.time()
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.epoch", "--child", mode, "--spec", str(spec)],
                             env=env, stdout=subprocess.DEVNULL if not args.verbose else None,
                             stderr=subprocess.STDOUT if not args.verbose else None)
    peak: dict[str, float] = {}

    def poll() -> None:
        nonlocal peak
        while child.poll() is None:
            now = pss_by_title(descendants(child.pid))
            if sum(now.values()) > sum(peak.values()):
                peak = now
            time.sleep(args.pss_every)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rc = child.wait()
    wall = time.time() - start
    poller.join()
    if rc:
        raise RuntimeError(f"{mode} {model} rep {rep} exited with {rc} (rerun with --verbose to see its output)")
    marks = json.loads(out.read_text())
    ends = [marks["first_step"], *marks["epoch_end"]]
    return Run(
        model=model, mode=mode, rep=rep,
        startup_s=marks["first_step"] - start,
        epochs_s=[b - a for a, b in zip(ends, ends[1:])],
        eval_s=marks["eval_s"], checkpoint_s=marks["checkpoint_s"],
        wall_s=wall, peak_pss_mb=sum(peak.values()), peak_pss_by_process={k: round(v, 1) for k, v in peak.items()},
        torch_threads=marks["torch_threads"],
        load_before=load_before, load_after=os.getloadavg()[0],
    )


def summarize(runs: list[Run]) -> dict:
    """Per model and mode the medians; raymtl and plain_ray over bare (of medians and per rep)."""
    out: dict = {}
    for model in dict.fromkeys(r.model for r in runs):
        modes: dict = {}
        for mode in MODES:
            rs = [r for r in runs if r.model == model and r.mode == mode]
            if rs:
                modes[mode] = {
                    "steady_epoch_s": statistics.median(r.steady_s for r in rs),
                    "first_epoch_s": statistics.median(r.epochs_s[0] for r in rs),
                    "startup_s": statistics.median(r.startup_s for r in rs),
                    "peak_pss_mb": max(r.peak_pss_mb for r in rs),
                    "load_before": [r.load_before for r in rs],
                }
        ratios = {}
        if "bare" in modes:
            bare = {r.rep: r.steady_s for r in runs if r.model == model and r.mode == "bare"}
            for mode in ("raymtl", "raymtl_workers", "plain_ray"):
                if mode in modes:
                    ratios[f"{mode}/bare"] = {
                        "of_medians": modes[mode]["steady_epoch_s"] / modes["bare"]["steady_epoch_s"],
                        "per_rep": [r.steady_s / bare[r.rep] for r in runs
                                    if r.model == model and r.mode == mode and r.rep in bare],
                    }
        out[model] = {"modes": modes, "ratios": ratios, "targets": targets(model, modes, ratios)}
    return out


def targets(model: str, modes: dict, ratios: dict) -> dict:
    out = {}
    if "raymtl/bare" in ratios:
        value = ratios["raymtl/bare"]["of_medians"]
        out[f"raymtl steady epoch <= {TARGET_RATIO} x bare"] = {"value": value, "met": value <= TARGET_RATIO}
    if "raymtl" in modes:
        value = modes["raymtl"]["startup_s"]
        out[f"raymtl start-up <= {TARGET_STARTUP_S:.0f} s"] = {"value": value, "met": value <= TARGET_STARTUP_S}
        if model == "resnet50":
            value = modes["raymtl"]["peak_pss_mb"]
            out["raymtl peak PSS <= 2.5 GB"] = {"value": value, "met": value <= TARGET_PSS_MB}
    return out


def print_table(summary: dict) -> None:
    print(f"\n{'model':<9} {'mode':<14} {'steady s':>9} {'1st epoch s':>12} {'start-up s':>11} {'peak PSS MB':>12}")
    for model, s in summary.items():
        for mode, m in s["modes"].items():
            print(f"{model:<9} {mode:<14} {m['steady_epoch_s']:>9.2f} {m['first_epoch_s']:>12.2f} "
                  f"{m['startup_s']:>11.1f} {m['peak_pss_mb']:>12.0f}")
        for name, r in s["ratios"].items():
            print(f"{model:<9} {name}: {r['of_medians']:.3f} (per rep {', '.join(f'{x:.3f}' for x in r['per_rep'])})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, help="steps per epoch for every model (default: resnet50 9, resnet18 36)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run: the first, then steady ones (their median)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of pause before every run")
    parser.add_argument("--pss-every", type=float, default=1.0, help="seconds between PSS samples")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every run)")
    parser.add_argument("--verbose", action="store_true", help="show the runs' own output")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and (args.steps % len(TASKS) or args.steps < len(TASKS)):
        parser.error(f"--steps must be a positive multiple of {len(TASKS)}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec)
        return None
    report: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": {"cpu_count": os.cpu_count()}}
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="raymtl_epoch_") as tmp:
        work = Path(tmp)
        data = {m: write_data(work / "data", m, args.steps or DEFAULT_STEPS[m]) for m in args.models}
        for rep in range(args.reps):
            modes = args.modes[rep % len(args.modes) :] + args.modes[: rep % len(args.modes)]
            for model in args.models:
                for mode in modes:
                    time.sleep(args.settle)
                    runs.append(run_child(mode, model, rep, data[model], args, work))
                    print(f"[epoch] {json.dumps(asdict(runs[-1]))}", flush=True)
                    report.update(runs=[asdict(r) for r in runs], summary=summarize(runs))
                    if args.json:
                        args.json.write_text(json.dumps(report, indent=2))
    print_table(report["summary"])
    return report


if __name__ == "__main__":
    main()
