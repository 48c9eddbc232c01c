"""How one grouping-search measurement (lookahead affinity) scales with the task count T.

    python -m benchmarks.affinity_scale --json benchmarks/results/affinity_scale.json

T = 8, 16, 32 small image+text tasks in one group (resnet18 on 16x16 images, a 2-layer text
encoder, 64 recent rows per task, Adam's lookahead step after one optimizer step), CPU. For each T
one measurement of `lookahead_affinity` as the training loop calls it (`training.affinity_rows`
64, `training.affinity_lookahead_rows` 512) is timed (median of `--reps`), and so is the
implementation of `--baseline` (a git commit; default the one before the rewrite) once at
`--baseline-tasks`, each in a fresh process.

Peak memory of a measurement: the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs just before the call) minus its resident set then. glibc keeps freed heap
memory resident and would hide new allocations in it, so the child runs with a fixed mmap
threshold (MALLOC_MMAP_THRESHOLD_=131072): every tensor of 128 KiB or more is its own mapping,
returned on free, and the resident set follows what is live. The figure is set against the bytes
of the shared parameters (those that take the lookahead step). The 1-minute load is recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = "f4309f1"
TINY_TEXT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, max_position_embeddings=32)


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def child(tasks: int, rows: int, lookahead_rows: int, reps: int, module_path: str | None) -> dict:
    """One T in this process: times and peak memory of `reps` measurements."""
    import torch
    import torch.nn.functional as F

    from raymtl.config import ModelSpec
    from raymtl.data.task_info import TaskInfo
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.train import affinity as current

    impl = current
    if module_path:  # the baseline's affinity module, imported from its source
        spec = importlib.util.spec_from_file_location("baseline_affinity", module_path)
        impl = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(impl)
    torch.manual_seed(0)
    names = [f"t{i:02d}" for i in range(tasks)]
    infos = {t: TaskInfo(t, "multiclass", ["0", "1", "2", "3"], 256, 64, True, True) for t in names}
    model_spec = ModelSpec(image_backbone="resnet18", text_config=TINY_TEXT, hidden_dim=64, dropout=0.1)
    model = MultiTaskModel(model_spec, infos, ["full"], {"all": names}).train()
    data = {t: {"view_full": torch.randn(rows, 3, 16, 16), "input_ids": torch.randint(1, 1000, (rows, 16)),
                "attention_mask": torch.ones(rows, 16, dtype=torch.long), "label": torch.randint(0, 4, (rows,))}
            for t in names}
    losses = {t: F.cross_entropy for t in names}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses[names[0]](model(data[names[0]], task=names[0]), data[names[0]]["label"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update = impl.optimizer_update(optimizer, model)
    shared = impl.shared_parameter_names(model)
    params = dict(model.named_parameters())
    shared_bytes = sum(params[n].numel() * params[n].element_size() for n in shared)
    kwargs = {} if module_path else {"lookahead_rows": lookahead_rows}
    seconds, peaks = [], []
    for _ in range(reps):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss = _status("VmRSS")
        start = time.perf_counter()
        impl.lookahead_affinity(model, data, losses, 1e-3, update=update, **kwargs)
        seconds.append(time.perf_counter() - start)
        peaks.append(_status("VmHWM") - rss)
    return {"tasks": tasks, "seconds": seconds, "median_s": statistics.median(seconds),
            "peak_bytes": max(peaks), "shared_param_bytes": shared_bytes,
            "peak_over_shared": max(peaks) / shared_bytes, "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace, tasks: int, reps: int, module_path: str | None) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-m", "benchmarks.affinity_scale", "--child", str(tasks), "--reps", str(reps),
           "--rows", str(args.rows), "--lookahead-rows", str(args.lookahead_rows)]
    if module_path:
        cmd += ["--module", module_path]
    load = _load()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "load_before": load, "load_after": _load()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="affinity_scale.json")
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rows", type=int, default=64, help="training.affinity_rows")
    parser.add_argument("--lookahead-rows", type=int, default=512, help="training.affinity_lookahead_rows")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="git commit whose implementation to compare; '' = none")
    parser.add_argument("--baseline-tasks", type=int, nargs="+", default=[8, 16],
                        help="T for the baseline (its T^2 passes make T=32 take minutes)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.lookahead_rows, args.reps, args.module)))
        return
    report = {"setup": {**{k: v for k, v in vars(args).items() if k not in ("child", "module")},
                        "cpus": os.cpu_count(), "memory": "peak VmHWM - VmRSS at the call, MALLOC_MMAP_THRESHOLD_=131072",
                        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                 text=True).stdout.strip()}}
    report["now"] = [run_child(args, t, args.reps, None) for t in args.tasks]
    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            source = subprocess.run(["git", "show", f"{args.baseline}:raymtl/train/affinity.py"], check=True,
                                    capture_output=True, text=True).stdout
            module = Path(tmp) / "baseline_affinity.py"
            module.write_text(source)
            report["baseline"] = [run_child(args, t, 1, str(module)) for t in args.baseline_tasks]
    for key in [k for k in ("now", "baseline") if k in report]:
        rows = {r["tasks"]: r for r in report[key]}
        lo, hi = min(rows), max(rows)
        report[f"{key}_ratio_T{hi}_over_T{lo}"] = {
            "time": rows[hi]["median_s"] / rows[lo]["median_s"],
            "peak_memory": rows[hi]["peak_bytes"] / rows[lo]["peak_bytes"],
        }
        for r in report[key]:
            print(f"{key:8s} T={r['tasks']:3d}  {r['median_s']:7.2f} s  peak {r['peak_bytes'] / 2**20:7.0f} MiB "
                  f"({r['peak_over_shared']:.2f}x shared params)  load {r['load_before']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
