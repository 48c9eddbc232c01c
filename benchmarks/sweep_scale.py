"""A sweep's fixed costs: how often it reads and decodes the data, how fast a trial starts, its memory.

    python -m benchmarks.sweep_scale --json benchmarks/results/sweep_scale.json

One sweep of 8 trials (4 seeds x 2 listed groupings of 4 small tasks: text-only and 16 px image-only
tasks as in `benchmarks.task_count`, resnet18 + a 1-layer text encoder, `data.cache: always`, 1 epoch,
1 worker per trial, 2 trials at a time), run by this checkout and by `--baseline` (a git commit, checked
out in a temporary worktree), one after the other in fresh processes on the same data. Each run:

  reads / decodes     calls of `datasets.build_inputs` (each reads every task's tables) and of those
                      with the cache (each decodes them), in any process of the sweep (the driver and
                      every Ray worker, counted through a worker_process_setup_hook)
  trial_start_s       per trial: Tune starting the trial -> its first training step
                      (the loop's `perf/first_step_unix`); median and each
  wall_s              the sweep command's wall time (Ray start to the summary)
  peak_pss_gb         most summed PSS of the command's process and all its descendants (Ray's processes)

The 1-minute load average is recorded before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.proc_tree import run_sampled

COUNT_ENV = "SWEEP_SCALE_COUNTS"
BASELINE = "f4309f1"


def count_hook() -> None:
    """Every call of `build_inputs` in this process appends a line to the counts file."""
    import raymtl.data.datasets as datasets

    original = datasets.build_inputs

    def counted(exp, infos, *, cache=False):
        with open(os.environ[COUNT_ENV], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "cache": bool(cache)}) + "\n")
        return original(exp, infos, cache=cache)

    datasets.build_inputs = counted


def child(config: str, out: str) -> None:
    """Run the sweep of `config` here with this checkout's raymtl; write what it measured to `out`."""
    import ray

    from raymtl import ray_runtime
    from raymtl.tune import progress
    from raymtl.tune.spec import load_sweep
    from raymtl.tune.sweep import run_sweep

    starts: dict[str, float] = {}

    class Timed(progress.TrialLines):
        def on_trial_start(self, iteration, trials, trial, **info):
            starts[trial.trial_id] = time.time()

    progress.TrialLines = Timed
    count_hook()
    for key, value in ray_runtime.LEAN_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": "benchmarks.sweep_scale.count_hook"})
    exp, spec = load_sweep(config)
    result = run_sweep(exp, spec)
    first = {}
    for trial in result.trials:
        lines = (Path(result.sweep_dir) / "runs" / trial.trial_id / "metrics.jsonl").read_text().splitlines()
        first[trial.trial_id] = json.loads(lines[0])["perf/first_step_unix"] - starts[trial.trial_id]
    Path(out).write_text(json.dumps({"trial_start_s": first, "errors": [t.error for t in result.trials if t.error]}))


def write_sweep(root: Path, seeds: int) -> Path:
    from benchmarks.task_count import write_config, write_tasks

    tasks = write_tasks(root, 4, np.random.default_rng(0))
    config = yaml.safe_load(write_config(root, tasks, "always").read_text())
    config["training"].update(epochs=1, cpus_per_worker=1)
    names = [t["name"] for t in tasks]
    config["sweep"] = {
        "groupings": [{"all": names}, {"text": names[0::2], "image": names[1::2]}],
        "baselines": False, "seeds": list(range(seeds)), "max_concurrent": 2,
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(code: Path, config: Path, work: Path, label: str) -> dict:
    counts, out = work / f"{label}-counts.jsonl", work / f"{label}-out.json"
    sweep_root = work / f"{label}-runs"
    raw = yaml.safe_load(config.read_text())
    raw["storage_path"] = str(sweep_root)
    own = work / f"{label}.yaml"
    own.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(code), COUNT_ENV: str(counts)}
    done = run_sampled([sys.executable, "-m", "benchmarks.sweep_scale", "--child", str(own), "--out", str(out)],
                       cwd=code, env=env)
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.output[-4000:]}")
    calls = [json.loads(line) for line in counts.read_text().splitlines()] if counts.exists() else []
    measured = json.loads(out.read_text())
    starts = measured["trial_start_s"]
    return {
        "code": label, "reads": len(calls), "decodes": sum(c["cache"] for c in calls),
        "reading_processes": len({c["pid"] for c in calls}),
        "trial_start_s": starts, "median_trial_start_s": statistics.median(starts.values()),
        "wall_s": done.wall_s, "peak_pss_gb": done.peak_pss / 2**30, "peak_processes": done.peak_processes,
        "errors": measured["errors"], "load_before": done.load_before, "load_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="sweep_scale.json")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--baseline", default=BASELINE, help="git commit to compare with; '' = none")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.out)
        return
    here = Path(__file__).resolve().parents[1]
    work = Path(args.work or tempfile.mkdtemp(prefix="sweep-scale-"))
    config = write_sweep(work / "data", args.seeds)
    report = {"setup": {"trials": 2 * args.seeds, "seeds": args.seeds, "groupings": 2, "tasks": 4,
                        "max_concurrent": 2, "cpus": os.cpu_count(), "ray_cpus": 4,
                        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                                 capture_output=True, text=True).stdout.strip()}}
    runs = []
    if args.baseline:
        old = work / "baseline-code"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline], cwd=here, check=True,
                       capture_output=True)
        try:
            for module in ("sweep_scale.py", "proc_tree.py"):  # the measuring code is today's
                shutil.copy(here / "benchmarks" / module, old / "benchmarks" / module)
            runs.append(run(old, config, work, f"baseline-{args.baseline}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=here, capture_output=True)
    runs.append(run(here, config, work, "now"))
    report["runs"] = runs
    if len(runs) == 2:
        before, now = runs
        report["ratio_now_over_baseline"] = {
            key: now[key] / before[key] for key in ("median_trial_start_s", "wall_s", "peak_pss_gb")
        }
    for r in runs:
        print(f"{r['code']:18s} reads {r['reads']} decodes {r['decodes']}  median start {r['median_trial_start_s']:.1f} s  "
              f"wall {r['wall_s']:.0f} s  peak PSS {r['peak_pss_gb']:.2f} GB  load {r['load_before']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
