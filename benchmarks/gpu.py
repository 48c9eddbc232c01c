"""The GPU check: raymtl's training and prediction rates on one GPU against a bare PyTorch loop.

    python3 -m benchmarks.gpu --json benchmarks/results/gpu.json     # one GPU, ~7 min in all
    python3 -m benchmarks.gpu --tiny --json /tmp/gpu_tiny.json        # CPU: a tiny configuration

One call, time-boxed (`--budget-s`, 420 s by default, data generation included). It writes its own
data first: noisy JPEGs of 400-800 px (a process pool, all cores) and two image tasks over them
(10 and 4 classes, random labels: the rates are what is measured, not accuracy). Then five modes,
each in a fresh subprocess with its own time limit, so that one mode's failure, hang or memory
does not touch the others:

  bare          the limit: a plain PyTorch loop with the same model (raymtl's `build_model`:
                ResNet-50 over full + crop views at 224 px), batch 64, bf16 autocast,
                channels_last, fused AdamW, inputs already on the GPU, the random-task schedule
  in_process    `raymtl.train.trainer.fit`, one worker trained in the command's process
                (`training.in_process`), the decoded inputs cached (`data.cache: always`)
  train_worker  the same on one Ray Train worker (`in_process: never`, `use_gpu`)
  streamed      in the process, JPEGs decoded by the CPUs while it trains (`data.cache: never`):
                its data wait, and the single-core decode rate (items/s) measured beforehand
  predict       `raymtl predict` (the Python API the command calls) over the in_process run's
                saved model, over the images and then over 3x them: items/s of its decode +
                model pipeline, and of the difference (the rate once the actors have started)

The raymtl modes are read from the run's own per-epoch metrics (`metrics.jsonl`: `perf/*`),
epochs after the first (warm-up: cuDNN autotuning, allocator growth) only; the bare loop times
`--steps` steps after `--warmup` steps between two CUDA synchronisations. Per mode: items/s, step
time, data wait, peak GPU memory (the process's `torch.cuda.max_memory_allocated` where it
trains, and the device's used memory sampled with nvidia-smi), peak host memory (summed PSS of
the mode's process tree: its Ray processes too), mean GPU utilisation, and the tree's CPU time
by process and thread (for the training modes also while the steps ran: what competed with the
thread that launches the kernels). Each mode starts once the previous one's processes are gone.
The JSON is rewritten after every mode, so a run cut short keeps what it measured; a failed mode
records its error.

`--tiny` (the default without CUDA) runs resnet18 at 32 px for a few steps on the CPU: a check
that every mode still runs (tests/test_gpu_check.py), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.proc_tree import Sampler, cores_busy, descendants, kill, session_pids, thread_cpu_s, title

MODES = ("bare", "in_process", "train_worker", "streamed", "predict")
TARGET_RATIO, TARGET_WAIT = 0.95, 0.05
CHILD_START = time.perf_counter()  # a mode's subprocess: when it began (its timing marks)
# Seconds each mode may take at most (also cut to what is left of --budget-s).
# Measured on an H200: bare 39 s; in_process 48 s (1536 images, 3 epochs), 69 s (4096, 4); train_worker 95 s,
# streamed 50 s (1536 images).
SETTLE_S = 20.0  # the most a mode's leftover processes are waited for before they are killed
MODE_LIMIT_S = {"bare": 55, "in_process": 85, "train_worker": 120, "streamed": 75, "predict": 130}


@dataclass(frozen=True)
class Setup:
    """The measured configuration (the GPU one, or `tiny` for a CPU check)."""

    backbone: str = "resnet50"
    image_size: int = 224
    batch_size: int = 64
    images: int = 4096  # JPEGs written; task i trains on rows [i*rows, (i+1)*rows)
    rows: int = 2048  # training rows per task
    val_rows: int = 128  # validation rows per task
    min_side: int = 400
    max_side: int = 800
    epochs: int = 5  # raymtl training modes; the first is warm-up
    streamed_epochs: int = 3
    bare_steps: int = 200
    bare_warmup: int = 20
    bare_max_s: float = 30.0
    predict_repeat: int = 3  # the second predict run covers the images this many times (the first: once)
    use_gpu: bool = True


TINY = Setup(backbone="resnet18", image_size=32, batch_size=8, images=64, rows=32, val_rows=8, min_side=40,
             max_side=80, epochs=2, streamed_epochs=2, bare_steps=6, bare_warmup=2, bare_max_s=20.0,
             predict_repeat=2, use_gpu=False)
TASKS = {"shape": 10, "tone": 4}  # task -> classes
VIEWS = [{"name": "full"}, {"name": "crop", "crop": 0.6}]


# ---------------------------------------------------------------- data


def _write_jpeg(job: tuple[str, int, int, int]) -> int:
    """One JPEG: smooth random colour fields plus pixel noise (decodes like a photo, not a flat image)."""
    from PIL import Image

    path, seed, lo, hi = job
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def write_data(root: Path, setup: Setup) -> dict:
    """The JPEGs (a process pool over all cores) and per-task train/val/predict parquet tables."""
    import pandas as pd

    start = time.perf_counter()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = [str(images / f"{i:06d}.jpg") for i in range(setup.images)]
    jobs = [(p, i, setup.min_side, setup.max_side) for i, p in enumerate(paths)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=max(1, len(jobs) // (8 * (os.cpu_count() or 1))))
    rng = np.random.default_rng(0)
    tables: dict[str, dict[str, str]] = {}
    for k, (task, classes) in enumerate(TASKS.items()):
        train = pd.DataFrame({"image": [paths[(k * setup.rows + i) % len(paths)] for i in range(setup.rows)],
                              "label": rng.permutation(np.arange(setup.rows) % classes)})
        tables[task] = {}
        for split, frame in (("train", train), ("val", train.head(setup.val_rows))):
            frame.to_parquet(file := root / f"{task}_{split}.parquet")
            tables[task][split] = str(file)
    inputs = []
    for repeat in (1, setup.predict_repeat):
        pd.DataFrame({"image": paths * repeat}).to_parquet(items := root / f"predict_x{repeat}.parquet")
        inputs.append(str(items))
    return {"tables": tables, "predict_input": inputs, "seconds": time.perf_counter() - start,
            "images": len(paths), "mean_jpeg_kb": sum(sizes) / len(sizes) / 1024, "processes": os.cpu_count()}


def experiment(name: str, setup: Setup, tables: dict, storage: Path, *, in_process: str, cache: str):
    from raymtl.config import load_experiment

    return load_experiment({
        "name": name,
        "storage_path": str(storage),
        "tasks": [{"name": t, "train": p["train"], "validation": p["val"], "image_column": "image",
                   "labels": list(range(TASKS[t]))} for t, p in tables.items()],
        "data": {"image_size": setup.image_size, "views": VIEWS, "cache": cache},
        "model": {"image_backbone": setup.backbone, "hidden_dim": 256},
        "training": {"epochs": setup.epochs if cache != "never" else setup.streamed_epochs,
                     "batch_size": setup.batch_size, "eval_batch_size": 2 * setup.batch_size,
                     "use_gpu": setup.use_gpu, "in_process": in_process, "keep_checkpoints": 1,
                     "cpus_per_worker": max(1, (os.cpu_count() or 2) // 2)},
    })


# ---------------------------------------------------------------- children (one per mode)


def _peak_gpu_bytes() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def child_bare(spec: dict) -> dict:
    """The limit: the same model, inputs on the device, nothing between the steps but the steps."""
    import torch

    from raymtl.data.inspection import inspect_tasks
    from raymtl.data.schedule import TaskSchedule
    from raymtl.models.build import build_model
    from raymtl.train.losses import task_loss

    setup = Setup(**spec["setup"])
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as the raymtl modes' cpus_per_worker
    cuda = setup.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    exp = experiment("bare", setup, spec["tables"], Path(spec["work"]) / "runs", in_process="always", cache="always")
    infos = inspect_tasks(exp)
    model = build_model(exp, infos).to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=cuda)
    losses = {t.name: task_loss(t, infos[t.name]) for t in exp.tasks}
    size, b = setup.image_size, setup.batch_size
    fmt = torch.channels_last if cuda else torch.contiguous_format
    inputs = {f"view_{v['name']}": torch.randn(4 * b, 3, size, size, device=device).contiguous(memory_format=fmt)
              for v in VIEWS}
    labels = {t: torch.randint(0, TASKS[t], (4 * b,), device=device) for t in TASKS}
    steps = TaskSchedule({t: 10_000 for t in TASKS}, 0, 0, "shuffled", 2.0).steps()

    def step(i: int) -> None:
        task, lo = steps[i], (i % 4) * b
        batch = {k: v[lo : lo + b] for k, v in inputs.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(batch, task=task)
        loss = losses[task](logits.float(), labels[task][lo : lo + b])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    built = time.perf_counter()
    for i in range(setup.bare_warmup):
        step(i)
    sync()
    warm_s = time.perf_counter() - built
    start, done = time.perf_counter(), 0
    while done < setup.bare_steps and time.perf_counter() - start < setup.bare_max_s:
        for _ in range(10):  # check the clock every 10 steps, one sync each
            step(setup.bare_warmup + done)
            done += 1
        sync()
    seconds = time.perf_counter() - start
    return {"items_per_s": done * b / seconds, "step_s": seconds / done, "data_wait_fraction": 0.0,
            "steps_timed": done, "torch_peak_gpu_mb": _mb(_peak_gpu_bytes()), "warmup_s": warm_s,
            "ready_s": built - CHILD_START}


def child_train(spec: dict, mode: str) -> dict:
    """A raymtl run (`fit`); the parent reads its metrics.jsonl (also after a timeout)."""
    from raymtl.train.trainer import fit

    setup = Setup(**spec["setup"])
    out: dict = {"imports_s": time.perf_counter() - CHILD_START}
    if mode == "streamed":
        out["decode_items_per_s_per_core"] = decode_rate(spec, setup)
    in_process = "never" if mode == "train_worker" else "always"
    cache = "never" if mode == "streamed" else "always"
    exp = experiment(mode, setup, spec["tables"], Path(spec["work"]) / "runs", in_process=in_process, cache=cache)
    fit_start = time.time()
    result = fit(exp)
    out["fit_s"] = time.time() - fit_start
    if result.history and "perf/first_step_unix" in result.history[0]:
        out["fit_to_first_step_s"] = result.history[0]["perf/first_step_unix"] - fit_start
    out["checkpoint"] = result.best_checkpoint or result.checkpoint
    out["torch_peak_gpu_mb"] = _mb(_peak_gpu_bytes()) if mode != "train_worker" else None
    return out


def decode_rate(spec: dict, setup: Setup) -> float:
    """Items/s one core turns from JPEG rows into model inputs (raymtl's Preprocessor, both views)."""
    import pandas as pd
    import torch

    from raymtl.data.inspection import inspect_tasks
    from raymtl.data.transforms import Preprocessor

    torch.set_num_threads(1)
    exp = experiment("decode", setup, spec["tables"], Path(spec["work"]) / "runs", in_process="always", cache="never")
    task = exp.tasks[0]
    rows = pd.read_parquet(spec["tables"][task.name]["train"]).head(max(16, min(256, setup.rows)))
    prep = Preprocessor(task, inspect_tasks(exp)[task.name], exp.data)
    prep(rows.head(4))  # warm: imports, first allocations
    start = time.perf_counter()
    prep(rows)
    return len(rows) / (time.perf_counter() - start)


def child_predict(spec: dict) -> dict:
    import torch

    from raymtl.predict import predict

    model = spec.get("model")
    if not model:
        raise RuntimeError("no saved model: the in_process mode did not leave a checkpoint")
    setup = Setup(**spec["setup"])
    gpus = 1.0 if setup.use_gpu and torch.cuda.is_available() else 0.0
    # Two runs, N and k*N items: the second's rate includes the actors' start-up (a job's fixed
    # cost), the difference between the two is the rate a long job settles at.
    small, large = (predict(model, items, str(Path(spec["work"]) / "predictions"), batch_size=setup.batch_size,
                            num_gpus=gpus, overwrite=True, local=False) for items in spec["predict_input"])
    extra_s = large.seconds - small.seconds
    return {"items_per_s": large.items_per_s, "seconds": large.seconds, "rows": large.rows_out,
            "bad_rows": large.bad_rows, "num_gpus": gpus, "small_rows": small.rows_out, "small_seconds": small.seconds,
            "steady_items_per_s": (large.rows_out - small.rows_out) / extra_s if extra_s > 0 else None}


def child_main(mode: str, spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    if mode == "bare":
        result = child_bare(spec)
    elif mode == "predict":
        result = child_predict(spec)
    else:
        result = child_train(spec, mode)
    result["child_peak_rss_mb"] = _self_peak_rss_mb()
    result["child_s"] = time.perf_counter() - CHILD_START
    Path(out_file).write_text(json.dumps(result))


def _self_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mb(nbytes: int | float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


# ---------------------------------------------------------------- the parent: sampling, modes, JSON


def smi(query: str) -> list[str] | None:
    """nvidia-smi's values of `query` (comma-separated fields) for GPU 0; None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        line = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in line.split(",")]
    return values if len(values) == len(query.split(",")) else None


def number(value: str) -> float | None:
    """An nvidia-smi figure; None where the GPU reports none ("[N/A]": MIG slices, some virtual GPUs)."""
    try:
        return float(value)
    except ValueError:
        return None


class GpuSampler(Sampler):
    """The process tree's peak PSS, CPU time by process and by thread, and the GPU's used memory and
    utilisation (nvidia-smi), every second. The CPU figures say what ran beside the training thread:
    at ~30 ms a step a GPU waits for the thread that launches its kernels, so another busy thread or
    process on its core shows up as a slower step. A process's last second before it exits is not
    seen."""

    def __init__(self, root: int, every_s: float = 1.0) -> None:
        super().__init__(root, every_s)
        self.has_smi = shutil.which("nvidia-smi") is not None
        self.gpu_used_mb: list[float] = []
        self.gpu_util: list[float] = []
        self.titles: dict[int, str] = {}
        self.cpu: dict[tuple[int, int], tuple[str, str, float]] = {}  # (pid, tid) -> process, thread, CPU s so far
        self.snapshots: list[tuple[float, dict]] = []  # (unix time, `cpu` then)

    def sample(self) -> None:
        super().sample()
        for pid in self.procs:
            name = title(pid)  # read again: a Ray worker takes its actor's title once it has one
            if name == "?":  # exiting: the name it had
                name = self.titles.get(pid, name)
            self.titles[pid] = name
            for tid, (thread, seconds) in thread_cpu_s(pid).items():
                self.cpu[(pid, tid)] = (name, thread, seconds)
        self.snapshots.append((time.time(), dict(self.cpu)))
        values = smi("memory.used,utilization.gpu") if self.has_smi else None
        used, util = map(number, values) if values else (None, None)
        if used is not None:
            self.gpu_used_mb.append(used)
        if util is not None:
            self.gpu_util.append(util)

    def cores_between(self, t0: float, t1: float) -> dict | None:
        """Cores used (CPU seconds per second) by process and by thread between the first sample at
        or after `t0` and the last at or before `t1`; None without two such samples."""
        inside = [(t, cpu) for t, cpu in self.snapshots if t0 <= t <= t1]
        if len(inside) < 2:
            return None
        (a, before), (b, after) = inside[0], inside[-1]
        spent = {key: (name, thread, seconds - before.get(key, ("", "", 0.0))[2])
                 for key, (name, thread, seconds) in after.items()}
        return {"window_s": round(b - a, 1), **_by_process_and_thread(spent.values(), b - a)}

    def summary(self) -> dict:
        busy = [u for u in self.gpu_util if u > 0]
        totals = _by_process_and_thread(self.cpu.values())
        return {
            "host_peak_pss_mb": self.peak_pss / 2**20,
            "device_peak_used_mb": max(self.gpu_used_mb) if self.gpu_used_mb else None,
            "gpu_util_mean_busy": statistics.mean(busy) if busy else None,
            "cpu_s": round(sum(totals["by_process"].values()), 1),
            "cpu_s_by_process": totals["by_process"],
            "cpu_s_by_thread": totals["by_thread"],
            "pss_samples": self.samples,
            "sampler_cpu_s": round(self.cpu_s, 2),
        }


def _by_process_and_thread(spent, per_s: float = 1.0) -> dict:
    """CPU seconds (divided by `per_s`) summed by process title and by process / thread name, largest first."""
    by_process: dict[str, float] = {}
    by_thread: dict[str, float] = {}
    for name, thread, seconds in spent:
        by_process[name] = by_process.get(name, 0.0) + seconds / per_s
        by_thread[f"{name} / {thread}"] = by_thread.get(f"{name} / {thread}", 0.0) + seconds / per_s
    return {"by_process": _top(by_process, 8), "by_thread": _top(by_thread, 12)}


def _top(values: dict[str, float], n: int) -> dict[str, float]:
    return {k: round(v, 2) for k, v in sorted(values.items(), key=lambda kv: -kv[1])[:n] if round(v, 2)}


def steady_perf(run_dir: Path, batch_size: int) -> dict:
    """The run's epochs after the first (all of them when there is one), from its metrics.jsonl."""
    file = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []
    rows = [r for r in rows if "perf/samples_per_s" in r]
    if not rows:
        return {"epochs_reported": 0}
    steady = rows[1:] or rows
    rate = statistics.median(r["perf/samples_per_s"] for r in steady)
    wait = statistics.median(r.get("perf/data_wait_fraction", 0.0) for r in steady)
    out = {"items_per_s": rate, "step_s": batch_size / rate, "compute_step_s": batch_size * (1 - wait) / rate,
           "data_wait_fraction": wait, "epochs_reported": len(rows), "epochs_steady": len(steady),
           "epoch_s": [r.get("perf/epoch_s") for r in rows], "eval_s": [r.get("perf/eval_s") for r in rows],
           "first_batch_wait_s": [r.get("perf/first_batch_wait_s") for r in rows]}
    peaks = [r["perf/peak_gpu_mb"] for r in rows if r.get("perf/peak_gpu_mb") is not None]
    if peaks:
        out["torch_peak_gpu_mb"] = max(peaks)
    marks = [r.get("perf/first_step_unix") for r in rows[1:]]
    if len(marks) >= 2 and None not in marks:  # the second epoch's first step to the last epoch's
        out["steady_window_unix"] = [marks[0], marks[-1]]
    return out


def run_mode(mode: str, spec: dict, work: Path, limit_s: float, verbose: bool) -> dict:
    """One mode in a fresh subprocess, killed (with its process group) past `limit_s`."""
    spec_file, out_file = work / f"{mode}.spec.json", work / f"{mode}.result.json"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    log = work / f"{mode}.log"
    busy = cores_busy()
    start, load = time.perf_counter(), os.getloadavg()[0]
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--child", mode, str(spec_file), str(out_file)],
                                stdout=None if verbose else sink, stderr=subprocess.STDOUT if not verbose else None,
                                start_new_session=True)
        error = None
        with GpuSampler(proc.pid) as sampler:
            try:
                proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                error = f"timed out after {limit_s:.0f} s"
                _kill_tree(proc)
        sampled = sampler.summary()
    wall = time.perf_counter() - start
    stragglers = outlive(proc.pid)
    result: dict = {"wall_s": wall, "limit_s": limit_s, "load_before": load, "cores_busy_before": busy if busy is None else round(busy, 2),
                    "load_after": os.getloadavg()[0], **sampled, **stragglers}
    if out_file.is_file():
        result.update(json.loads(out_file.read_text()))
        if error:  # measured, then cut off while shutting down (Ray's processes)
            result["note"], error = f"{error}, after writing its result", None
    elif error is None:
        error = f"exit status {proc.returncode}"
    if mode in ("in_process", "train_worker", "streamed"):
        result.update(steady_perf(work / "runs" / mode, spec["setup"]["batch_size"]))
        if "steady_window_unix" in result:  # what used the CPUs while the steps ran
            result["steady_cores"] = sampler.cores_between(*result["steady_window_unix"])
    if error:
        result["error"] = error
        result["log_tail"] = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    return result


def outlive(sid: int, wait_s: float = SETTLE_S) -> dict:
    """Wait for the processes the mode left in its session (Ray's daemons and workers shutting down),
    killing what is left after `wait_s`, so that the next mode starts on a quiet machine."""
    start = time.perf_counter()
    left = session_pids(sid)
    while left and time.perf_counter() - start < wait_s:
        time.sleep(0.5)
        left = session_pids(sid)
    names = sorted({title(pid) for pid in left})
    kill(left)
    return {"settle_s": round(time.perf_counter() - start, 1), "killed_after_settle": names}


def _kill_tree(proc: subprocess.Popen) -> None:
    """The child and everything it started (Ray's processes too): its own session, then stragglers by pid."""
    pids = descendants(proc.pid)
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        pass
    kill(pids)
    proc.wait()


def environment() -> dict:
    """Versions, the GPU and how busy the machine is before the modes run (this process opens no
    CUDA context: the device figures of the modes are theirs, plus whatever `gpu_used_mb_idle` shows)."""
    import torch

    idle = smi("name,driver_version,memory.used,memory.total,utilization.gpu")
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0], "cuda_available": torch.cuda.is_available(),
            "unix_time": time.time()}
    if idle:
        info.update(gpu=idle[0], driver=idle[1], gpu_used_mb_idle=number(idle[2]), gpu_memory_mb=number(idle[3]),
                    gpu_util_idle=number(idle[4]), gpu_count=torch.cuda.device_count())
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def summarise(modes: dict) -> dict:
    """Ratios to the bare loop and the issue's targets, where both sides were measured."""
    bare = modes.get("bare", {}).get("items_per_s")
    out: dict = {}
    for mode in ("in_process", "train_worker", "streamed", "predict"):
        rate = modes.get(mode, {}).get("items_per_s")
        if bare and rate:
            out[f"{mode}_vs_bare"] = rate / bare
    for mode in ("in_process", "train_worker"):
        if f"{mode}_vs_bare" in out:
            out[f"{mode}_meets_{TARGET_RATIO}"] = out[f"{mode}_vs_bare"] >= TARGET_RATIO
    streamed = modes.get("streamed", {})
    if "data_wait_fraction" in streamed:
        out[f"streamed_wait_meets_{TARGET_WAIT}"] = streamed["data_wait_fraction"] <= TARGET_WAIT
        if streamed.get("items_per_s"):
            out["streamed_items_per_s_per_cpu"] = streamed["items_per_s"] / (os.cpu_count() or 1)
    if streamed.get("decode_items_per_s_per_core"):  # what all cores could decode, were they doing nothing else
        out["decode_ceiling_items_per_s"] = streamed["decode_items_per_s_per_core"] * (os.cpu_count() or 1)
    return out


def write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="result file, rewritten after every mode")
    p.add_argument("--tiny", action="store_true", help="resnet18 at 32 px on the CPU (the default without CUDA)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole call, data generation included")
    p.add_argument("--work", type=Path, help="folder for data and runs (default: a temporary one, removed)")
    p.add_argument("--images", type=int, help="JPEGs to write (default 4096; tiny 64)")
    p.add_argument("--rows", type=int, help="training rows per task (default 2048; tiny 32)")
    p.add_argument("--epochs", type=int, help="epochs of the cached training modes (default 5; tiny 2)")
    p.add_argument("--batch-size", type=int, help="rows per step (default 64; tiny 8)")
    p.add_argument("--image-size", type=int, help="pixels of each view's side (default 224; tiny 32)")
    p.add_argument("--verbose", action="store_true", help="the modes' own output on this terminal")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = args.budget_s
    deadline = time.perf_counter() + budget
    import torch

    tiny = args.tiny or not torch.cuda.is_available()
    setup = TINY if tiny else Setup()
    resized = {key: getattr(args, key) for key in ("images", "rows", "epochs", "batch_size", "image_size")
               if getattr(args, key)}
    if args.images and not args.rows:  # two tasks' rows fit in the images
        resized["rows"] = min(setup.rows, args.images // 2)
    setup = replace(setup, **resized)
    work = args.work or Path(tempfile.mkdtemp(prefix="raymtl_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "gpu", "tiny": tiny, "setup": asdict(setup), "budget_s": budget,
                    "environment": environment(), "modes": {}, "errors": {}}
    write_json(args.json, report)
    try:
        data = write_data(work / "data", setup)
        report["data"] = {k: v for k, v in data.items() if k not in ("tables", "predict_input")}
        write_json(args.json, report)
        spec = {"setup": asdict(setup), "tables": data["tables"], "predict_input": data["predict_input"],
                "work": str(work)}
        for mode in args.modes:
            left = deadline - time.perf_counter()
            if left < 20:
                report["errors"][mode] = f"skipped: {left:.0f} s of the budget left"
                continue
            if mode == "predict":
                spec["model"] = _saved_model(report["modes"], work)
            try:
                result = run_mode(mode, spec, work, min(MODE_LIMIT_S[mode] * (3 if tiny else 1), left - 5), args.verbose)
            except Exception:  # noqa: BLE001 -- one mode's failure leaves the others' numbers
                result = {"error": traceback.format_exc(limit=5)}
            report["modes"][mode] = result
            if "error" in result:
                report["errors"][mode] = result["error"]
            report["summary"] = summarise(report["modes"])
            write_json(args.json, report)
            print(f"[gpu] {mode}: " + ", ".join(f"{k}={_short(result.get(k))}" for k in
                  ("items_per_s", "step_s", "data_wait_fraction", "torch_peak_gpu_mb", "host_peak_pss_mb", "wall_s", "error")
                  if result.get(k) is not None), flush=True)
    finally:
        report["wall_s"] = budget - (deadline - time.perf_counter())
        write_json(args.json, report)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report.get("summary", {}), indent=2))
    return report


def _saved_model(modes: dict, work: Path) -> str | None:
    """The in_process run's checkpoint, else any training mode's newest."""
    for mode in ("in_process", "train_worker", "streamed"):
        if modes.get(mode, {}).get("checkpoint"):
            return modes[mode]["checkpoint"]
    found = sorted((work / "runs").glob("*/checkpoint_*"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)[:200]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    else:
        main()
