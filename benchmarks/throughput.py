"""Training throughput of raymtl against a plain single-process PyTorch loop.

    python -m benchmarks.throughput --reps 3 --steps 48 --out throughput.json

Every mode trains the same MultiTaskModel (resnet18, one view) on the same synthetic catalogue
(two image tasks, read into pandas DataFrames) with the same random-task schedule
(`raymtl.data.schedule.TaskSchedule`), optimizer and losses, for one epoch of `--steps` steps:

  plain          one process, batches sliced from in-memory tensors preprocessed once: the limit
  plain_raydata  the same loop fed by raymtl's streamed Ray Data path (`build_inputs`, the rank's
                 plan, `TaskBatches`): the data path of a Ray Train worker, without Ray Train;
                 gives the wait for the next batch
  raymtl_1w      `raymtl.train.trainer.fit`, 1 worker with `--threads` CPUs
  raymtl_2w      `fit`, 2 workers with `--threads // 2` CPUs each (the same cores in total)

Ray sets OMP_NUM_THREADS to a worker's CPUs, so torch uses `cpus_per_worker` threads there; the
plain loops call `torch.set_num_threads` with the same number (checked and recorded).

Steady state drops the first `--warmup` fraction of the steps. The plain loops time each step
(`wait` = getting the batch, `step` = wait + forward/backward/update). A `fit` run is timed from
rank 0's progress lines ("epoch E step S/N ...", about every tenth of an epoch), which Ray Train
writes with `timestamp_ns` and `run_name` to `<session>/logs/train/ray-train-app-worker-*.log`;
its data wait is the loop's own `perf/data_wait_fraction` (rank 0, each task's first batch apart).
Start-up (`fit` called -> step 0 at the steady rate) and teardown (last step -> `fit` returned)
are reported apart, as is the start of the local Ray cluster (once per invocation). Modes run
interleaved (every rep runs every mode, in an order rotated by one per rep, after a `--settle`
pause) so that background load and the previous run's wind-down hit them alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from raymtl.config import DataSpec, Experiment, ModelSpec, TaskSpec, TrainingSpec, ViewSpec
from raymtl.data.schedule import TaskSchedule
from raymtl.data.synthetic import make_catalogue
from raymtl.data.inspection import inspect_tasks
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import Preprocessor
from raymtl.models.build import build_model
from raymtl.data.device_inputs import DeviceInputs
from raymtl.train.batches import TaskBatches, batches_per_epoch
from raymtl.train.losses import task_loss
from raymtl.train.optim import build_optimizer

MODES = ("plain", "plain_raydata", "raymtl_1w", "raymtl_2w")
TASKS = ("color", "pattern")
PROGRESS = re.compile(r"epoch (\d+) step (\d+)/(\d+) ")
TARGET_RATIO, TARGET_WAIT = 0.95, 0.05

Batch = dict[str, torch.Tensor]


@dataclass
class RunResult:
    mode: str
    rep: int
    samples_per_s: float  # steady state, all workers together
    step_s: float  # steady-state seconds per step (per worker)
    wait_fraction: float | None  # of steady step time spent getting the next batch; None = not measured
    first_batch_wait_s: float | None = None  # summed wait for each task's first batch (pipeline start)
    startup_s: float | None = None  # fit() called -> step 0 at the steady rate
    teardown_s: float | None = None  # last step -> fit() returned (evaluation, checkpoint, shutdown)
    wall_s: float = 0.0
    load_before: float = 0.0  # 1-minute load average when the run started


# ---------------------------------------------------------------- data and experiment


def catalogue_frames(root: Path, rows: int, image_size: int) -> dict[str, pd.DataFrame]:
    """`rows` train rows per task of the synthetic catalogue (PNG paths + labels) as DataFrames."""
    total = math.ceil(rows / 0.9) + 2  # make_catalogue keeps ~10% for validation
    paths = make_catalogue(root, seed=0, image_size=image_size, sizes=dict.fromkeys(TASKS, total), val_fraction=0.1)
    return {task: pd.read_parquet(p["train"]).head(rows)[["image", "label"]] for task, p in paths.items()}


def experiment(name: str, frames: dict[str, pd.DataFrame], args: argparse.Namespace, workers: int, storage: Path) -> Experiment:
    """One epoch over the frames, no validation split: only the training steps cost time."""
    return Experiment(
        name=name,
        tasks=[TaskSpec(name=task, train=df, image_column="image") for task, df in frames.items()],
        storage_path=str(storage),
        data=DataSpec(image_size=args.image_size, views=[ViewSpec("full")]),
        model=ModelSpec(image_backbone="resnet18", hidden_dim=128),
        training=TrainingSpec(
            epochs=1,
            batch_size=args.batch_size,
            num_workers=workers,
            cpus_per_worker=args.threads // workers,
            keep_checkpoints=1,
        ),
    ).validate()


# ---------------------------------------------------------------- plain loops


def memory_batches(exp: Experiment, infos: dict[str, TaskInfo], frames: dict[str, pd.DataFrame]) -> Callable[[str], Batch]:
    """Batches sliced from tensors preprocessed once (raymtl's Preprocessor), reshuffled per pass."""
    tensors = {}
    for task in exp.tasks:
        out = Preprocessor(task, infos[task.name], exp.data)(frames[task.name])
        tensors[task.name] = DeviceInputs(exp.data, "cpu")(out)
    rng = np.random.default_rng(0)
    order: dict[str, list[torch.Tensor]] = {}
    size = exp.training.batch_size

    def next_batch(task: str) -> Batch:
        if not order.get(task):
            n = len(tensors[task]["label"])
            perm = torch.as_tensor(rng.permutation(n))
            order[task] = [perm[i : i + size] for i in range(0, n - size + 1, size)]
        idx = order[task].pop()
        return {k: v[idx] for k, v in tensors[task].items()}

    return next_batch


def raydata_batches(exp: Experiment, infos: dict[str, TaskInfo]) -> Callable[[str], Batch]:
    """Batches of raymtl's streamed data path (`build_inputs`, the rank's plan, `TaskBatches`), as a worker reads them."""
    from raymtl.data.datasets import build_inputs
    from raymtl.data.plan import train_steps

    tr = exp.training
    schedule = TaskSchedule(batches_per_epoch(infos, tr.batch_size, 1), exp.seed, 0, tr.sampler, tr.temperature).steps()
    plan = train_steps(schedule, {t: i.n_train for t, i in infos.items()}, tr.batch_size,
                       seed=exp.seed, epoch=0, rank=0, world=1, shuffle=exp.data.shuffle)
    return TaskBatches(build_inputs(exp, infos), "train", plan, DeviceInputs(exp.data, "cpu"), None).next


def plain_loop(exp: Experiment, infos: dict[str, TaskInfo], next_batch: Callable[[str], Batch]) -> list[tuple[str, float, float]]:
    """One epoch of the random-batch loop as raymtl's worker runs it; (task, wait_s, step_s) per step."""
    tr = exp.training
    model = build_model(exp, infos).train()
    optimizer = build_optimizer(model, tr, tr.lr)
    losses = {t.name: task_loss(t, infos[t.name]) for t in exp.tasks}
    timings = []
    for task in TaskSchedule(batches_per_epoch(infos, tr.batch_size, 1), exp.seed, 0, tr.sampler, tr.temperature).steps():
        start = time.perf_counter()
        batch = next_batch(task)
        got = time.perf_counter()
        loss = losses[task](model(batch, task=task).float(), batch["label"]) * infos[task].weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the loop's EWMA update reads the loss every step
        timings.append((task, got - start, time.perf_counter() - start))
    return timings


def run_plain(mode: str, rep: int, exp: Experiment, frames: dict[str, pd.DataFrame], warmup: float) -> RunResult:
    load, start = os.getloadavg()[0], time.perf_counter()
    infos = inspect_tasks(exp)
    source = memory_batches(exp, infos, frames) if mode == "plain" else raydata_batches(exp, infos)
    timings = plain_loop(exp, infos, source)
    steady = timings[math.ceil(warmup * len(timings)) :]
    step_time = sum(s for _, _, s in steady) / len(steady)
    firsts = {}
    for task, wait, _ in timings:
        firsts.setdefault(task, wait)
    return RunResult(
        mode=mode,
        rep=rep,
        samples_per_s=exp.training.batch_size / step_time,
        step_s=step_time,
        wait_fraction=sum(w for _, w, _ in steady) / sum(s for _, _, s in steady),
        first_batch_wait_s=sum(firsts.values()),
        wall_s=time.perf_counter() - start,
        load_before=load,
    )


# ---------------------------------------------------------------- raymtl runs


def train_log_dir() -> Path:
    """Where Ray Train writes its JSON worker logs in this driver's Ray session."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "train"


def progress_marks(run_name: str) -> list[tuple[int, float]]:
    """(step, unix time) of rank 0's first-epoch progress lines of `run_name`."""
    marks = []
    for path in train_log_dir().glob("ray-train-app-worker-*.log"):
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            match = PROGRESS.match(record.get("message", ""))
            if record.get("run_name") == run_name and match and match.group(1) == "1":
                marks.append((int(match.group(2)), record["timestamp_ns"] / 1e9))
    if len(marks) < 2:
        raise RuntimeError(f"found {len(marks)} progress lines of run {run_name!r} under {train_log_dir()}")
    return sorted(marks)


def run_raymtl(mode: str, rep: int, exp: Experiment, warmup: float) -> RunResult:
    from raymtl.train.trainer import fit

    load, start = os.getloadavg()[0], time.time()
    row = fit(exp).history[-1]
    end = time.time()
    marks = progress_marks(exp.name)
    total = marks[-1][0]
    first = next(m for m in marks if m[0] >= warmup * total and m != marks[-1])
    step_time = (marks[-1][1] - first[1]) / (marks[-1][0] - first[0])
    tr = exp.training
    return RunResult(
        mode=mode,
        rep=rep,
        samples_per_s=tr.batch_size * tr.num_workers / step_time,
        step_s=step_time,
        wait_fraction=row["perf/data_wait_fraction"],  # rank 0's epoch, each task's first batch apart
        first_batch_wait_s=row["perf/first_batch_wait_s"],
        startup_s=first[1] - first[0] * step_time - start,
        teardown_s=end - marks[-1][1],
        wall_s=end - start,
        load_before=load,
    )


def run_mode(mode: str, rep: int, exp: Experiment, frames: dict[str, pd.DataFrame], warmup: float) -> RunResult:
    if mode.startswith("plain"):
        return run_plain(mode, rep, exp, frames, warmup)
    return run_raymtl(mode, rep, exp, warmup)


def ray_worker_threads(cpus: list[int]) -> dict[int, int]:
    """torch.get_num_threads() in a fresh Ray actor holding `c` CPUs, as a Train worker is.

    An actor, not a task: a task may reuse a worker process whose torch was set up for another
    task's CPUs. The actor is killed at once: its CPUs are needed by Ray Data next to training.
    """
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> int:
            return torch.get_num_threads()

    found = {}
    for c in cpus:
        probe = Probe.options(num_cpus=c).remote()
        found[c] = ray.get(probe.threads.remote())
        ray.kill(probe)
    return found


# ---------------------------------------------------------------- summary


def summarize(runs: list[RunResult]) -> dict:
    """Per mode the medians; ratios to `plain` (of the medians, and per rep: same load)."""
    by_mode: dict[str, list[RunResult]] = {}
    for r in runs:
        by_mode.setdefault(r.mode, []).append(r)
    summary = {}
    for mode, rs in by_mode.items():
        waits = [r.wait_fraction for r in rs if r.wait_fraction is not None]
        startups = [r.startup_s for r in rs if r.startup_s is not None]
        firsts = [r.first_batch_wait_s for r in rs if r.first_batch_wait_s is not None]
        summary[mode] = {
            "samples_per_s": statistics.median(r.samples_per_s for r in rs),
            "step_s": statistics.median(r.step_s for r in rs),
            "wait_fraction": statistics.median(waits) if waits else None,
            "first_batch_wait_s": statistics.median(firsts) if firsts else None,
            "startup_s": statistics.median(startups) if startups else None,
            "teardown_s": statistics.median(r.teardown_s for r in rs) if startups else None,
            "load_before": statistics.median(r.load_before for r in rs),
        }
    ratios = {}
    if "plain" in summary:
        plain = {r.rep: r.samples_per_s for r in by_mode["plain"]}
        for mode in summary:
            if mode != "plain":
                paired = [r.samples_per_s / plain[r.rep] for r in by_mode[mode] if r.rep in plain]
                ratios[f"{mode}/plain"] = {
                    "of_medians": summary[mode]["samples_per_s"] / summary["plain"]["samples_per_s"],
                    "per_rep": paired,
                    "median_per_rep": statistics.median(paired),
                }
    return {"modes": summary, "ratios": ratios, "targets": targets(summary, ratios)}


def targets(summary: dict, ratios: dict) -> dict:
    out = {}
    if "raymtl_1w/plain" in ratios:
        value = ratios["raymtl_1w/plain"]["of_medians"]
        out["raymtl_1w/plain >= 0.95"] = {"value": value, "met": value >= TARGET_RATIO}
    for mode in ("plain_raydata", "raymtl_1w", "raymtl_2w"):
        if mode in summary and summary[mode]["wait_fraction"] is not None:
            value = summary[mode]["wait_fraction"]
            out[f"{mode} data wait <= 5%"] = {"value": value, "met": value <= TARGET_WAIT}
    return out


def print_table(summary: dict) -> None:
    print(f"\n{'mode':<14} {'samples/s':>10} {'s/step':>8} {'wait':>7} {'1st batches s':>14} {'startup s':>10} {'load':>6}")
    for mode, s in summary["modes"].items():
        wait = f"{100 * s['wait_fraction']:.1f}%" if s["wait_fraction"] is not None else "-"
        first = f"{s['first_batch_wait_s']:.2f}" if s["first_batch_wait_s"] is not None else "-"
        startup = f"{s['startup_s']:.1f}" if s["startup_s"] is not None else "-"
        print(f"{mode:<14} {s['samples_per_s']:>10.1f} {s['step_s']:>8.3f} {wait:>7} {first:>14} {startup:>10} "
              f"{s['load_before']:>6.1f}")
    for name, r in summary["ratios"].items():
        print(f"{name}: {r['of_medians']:.3f} (per rep: {', '.join(f'{x:.3f}' for x in r['per_rep'])})")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every mode (medians are reported)")
    parser.add_argument("--steps", type=int, default=48, help="steps of one epoch with 1 worker (multiple of 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads = CPUs of the single worker")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the steps left out of steady state")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of pause before every run")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps % (2 * len(TASKS)) or args.steps < 10 * len(TASKS):
        parser.error(f"--steps must be a multiple of {2 * len(TASKS)} and >= {10 * len(TASKS)}")
    if args.threads < 2 and "raymtl_2w" in args.modes:
        parser.error("raymtl_2w needs --threads >= 2 (each of its 2 workers gets threads // 2)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run every mode `--reps` times, interleaved; the JSON report is rewritten after each run."""
    from raymtl.ray_runtime import ensure_ray

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ensure_ray()
    report = {
        "settings": {**vars(args), "out": str(args.out) if args.out else None, "tasks": list(TASKS),
                     "model": "resnet18, 1 view, hidden 128", "epochs_per_run": 1},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads_plain": torch.get_num_threads(),
                    "torch_threads_ray_worker": ray_worker_threads(sorted({args.threads, max(1, args.threads // 2)}))},
        "ray_start_s": time.perf_counter() - started,
    }
    workers = {"plain": 1, "plain_raydata": 1, "raymtl_1w": 1, "raymtl_2w": 2}
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="raymtl_bench_") as tmp:
        frames = catalogue_frames(Path(tmp) / "data", args.steps // len(TASKS) * args.batch_size, args.image_size)
        for rep in range(args.reps):
            for mode in args.modes[rep % len(args.modes) :] + args.modes[: rep % len(args.modes)]:
                time.sleep(args.settle)  # let the previous run's processes wind down
                exp = experiment(f"{mode}-{rep}-{time.time_ns()}", frames, args, workers[mode], Path(tmp) / "runs")
                runs.append(run_mode(mode, rep, exp, frames, args.warmup))
                print(f"[throughput] {json.dumps(asdict(runs[-1]))}", flush=True)
                report.update(load_after=os.getloadavg(), runs=[asdict(r) for r in runs], summary=summarize(runs))
                if args.out:
                    args.out.write_text(json.dumps(report, indent=2))
    print_table(report["summary"])
    return report


if __name__ == "__main__":
    main()
