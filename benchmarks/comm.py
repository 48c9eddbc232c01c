"""Gradient communication per step with task groups: bytes against the parameters a step uses, and the
communication left exposed by the overlapped sync against the sequential one.

    python -m benchmarks.comm --groups 1 2 4 --json comm.json

For G = 1, 2, 4 task groups (one resnet18 backbone each, one image task per group, no text) it runs
`raymtl.train.trainer.fit` with 2 workers (gloo) for one epoch of about `--steps` steps: the
library's real loop, with the `--modes` taking turns step by step (step i runs mode i mod the
number of modes, on every rank), so that every mode is timed over the same minutes:

- `off`: no gradient communication (the workers' `GradSync` behaves as on one process), only a
  one-element all-reduce at the step's end, so that the next step starts together on both ranks
  as it does after a sync (else the next step would pay for this one's difference between ranks):
  the step without sync;
- `before`: the gradient sync as it was before overlap (until 2026-12-04, `before_sync` below):
  after backward, bucket by bucket, each flattened into new memory, all-reduced and read on the
  host before the next;
- `sequential`: `GradSync(overlap=False)`: the library's sync with its buffers kept from step to
  step, but every bucket sent after backward, one after another: what overlap alone changes;
- `overlapped`: the library's sync, buckets launched from gradient hooks while backward runs;
- `bf16`: the overlapped sync with `training.grad_compression: bf16`.

Inside the workers `torch.distributed.all_reduce` is hooked and counts the bytes of every tensor it
reduces between `GradSync.start` and `GradSync.finish` (the step's gradient sync); collectives
outside it (evaluation, checkpoint) are counted apart. Next to it stands the size of the parameters
the step's task used (`MultiTaskModel.parameters_for`), and the step time: rank 0's time between
consecutive ends of the gradient sync, median over the mode's steps after the first `--warmup`
fraction of the epoch.
The exposed communication of a mode is its step time minus the `off` step time.

Targets: all-reduced bytes / used bytes <= 1.05 at every G (overlapped), step_s(G=4) <= 1.15 x
step_s(G=1), and at G = 1 the overlapped sync's exposed communication <= 0.6 x the one of the sync
before it (`before`); overlapped / sequential is reported beside it.
DDP over the whole model would reduce all G backbones at every step (~G x the used bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from raymtl.config import DataSpec, Experiment, ModelSpec, TaskSpec, TrainingSpec, ViewSpec
from raymtl.data.synthetic import TASK_KINDS, make_catalogue
from raymtl.train.collectives import all_reduce_sum
from raymtl.train.gradsync import BUCKET_BYTES, buckets

TASKS = list(TASK_KINDS)  # four image tasks
TARGET_BYTES_RATIO, TARGET_STEP_RATIO, TARGET_EXPOSED_RATIO = 1.05, 1.15, 0.6
MODES = ("off", "before", "sequential", "overlapped", "bf16")


def before_sync(params: list, had_batch: bool, bucket_bytes: int) -> bool:
    """The gradient sync before overlap (raymtl until 2026-12-04), for the comparison: after backward,
    bucket by bucket, gradients and flags flattened into new memory, all-reduced, read on the host."""
    contributors = 0.0
    with torch.no_grad():
        for bucket in buckets(params, bucket_bytes):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flags = torch.tensor([p.grad is not None for p in bucket] + [had_batch], dtype=grads[0].dtype,
                                 device=grads[0].device)
            flat = all_reduce_sum(torch.cat([_flatten_dense_tensors(grads), flags]))
            *produced, contributors = flat[-len(flags) :].tolist()
            if not contributors:
                continue
            for p, g, made in zip(bucket, _unflatten_dense_tensors(flat[: -len(flags)], bucket), produced):
                p.grad = g.div_(contributors) if made else None
    return bool(contributors)


def frames(root: Path, rows: int, image_size: int, tasks: list[str]) -> dict[str, pd.DataFrame]:
    """`rows` train rows per task (PNG paths + labels), no text column."""
    paths = make_catalogue(root, seed=0, image_size=image_size, sizes=dict.fromkeys(tasks, math.ceil(rows / 0.9) + 2),
                           val_fraction=0.1)
    return {task: pd.read_parquet(p["train"]).head(rows)[["image", "label"]] for task, p in paths.items()}


def experiment(name: str, data: dict[str, pd.DataFrame], args: argparse.Namespace, storage: Path) -> Experiment:
    return Experiment(
        name=name,
        tasks=[TaskSpec(name=task, kind=TASK_KINDS[task], train=df, image_column="image") for task, df in data.items()],
        storage_path=str(storage),
        data=DataSpec(image_size=args.image_size, views=[ViewSpec("full")]),
        model=ModelSpec(image_backbone="resnet18", hidden_dim=128, groups={f"g{i}": [t] for i, t in enumerate(data)}),
        training=TrainingSpec(epochs=1, batch_size=args.batch_size, num_workers=2, cpus_per_worker=args.threads // 2,
                              keep_checkpoints=1),
    ).validate()


def counting_collectives(loop, out_dir: str, modes: list[str], bucket_bytes: int):
    """`loop` with the gradient sync's mode taking turns step by step (`modes[step % len(modes)]`, the
    same on every rank), all_reduce bytes counted per gradient sync (and apart from it), rank by rank,
    and buckets of `bucket_bytes`."""

    def run(config):
        import json
        import time
        from pathlib import Path

        import ray.train
        import torch.distributed as dist

        from raymtl.train import gradsync

        steps, other = [], {"bytes": 0}
        real_reduce, real_init, real_ready = dist.all_reduce, gradsync.GradSync.__init__, gradsync.GradSync._ready
        real_start, real_finish, real_world_size = gradsync.GradSync.start, gradsync.GradSync.finish, gradsync.world_size

        def mode() -> str:
            return modes[(len(steps) - 1) % len(modes)] if steps else "overlapped"

        def all_reduce(t, *a, **k):
            (steps[-1] if steps and steps[-1]["open"] else other)["bytes"] += t.numel() * t.element_size()
            return real_reduce(t, *a, **k)

        def init(self, model, **kwargs):
            real_init(self, model, **kwargs, bucket_bytes=bucket_bytes)

        def ready(self, p):
            if mode() in ("overlapped", "bf16"):  # hooks armed by an earlier overlapped step stay idle
                real_ready(self, p)

        def start(self, task, had_batch):
            params = [p for p in self.model.parameters_for(task) if p.requires_grad]
            steps.append({"task": task, "used": sum(p.numel() * p.element_size() for p in params), "bytes": 0,
                          "open": True})
            this = mode()
            self.overlap = this != "sequential"
            self.wire = gradsync.COMPRESSIONS["bf16" if this == "bf16" else "none"]
            self.before = (params, had_batch) if this == "before" else None
            return None if this == "before" else real_start(self, task, had_batch)

        def finish(self):
            try:
                if mode() == "before":
                    return before_sync(*self.before, self.bucket_bytes)
                stepped = real_finish(self)
                if mode() == "off":
                    real_reduce(torch.zeros(1))  # the next step starts together on both ranks
                return stepped
            finally:
                steps[-1].update(open=False, t=time.perf_counter(), mode=mode())

        dist.all_reduce = all_reduce
        gradsync.GradSync.__init__, gradsync.GradSync.start, gradsync.GradSync.finish = init, start, finish
        gradsync.GradSync._ready = ready  # before any GradSync exists: its hooks bind this one
        gradsync.world_size = lambda: 1 if mode() == "off" else real_world_size()  # off: each rank keeps its own gradients
        try:
            loop(config)
        finally:
            rank = ray.train.get_context().get_world_rank()
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "other_bytes": other["bytes"]}))

    return run


def run_modes(groups: int, data: dict[str, pd.DataFrame], args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    """One epoch with `args.modes` taking turns step by step: every mode's steps spread over the same
    minutes, so this VM's drift between runs (up to a third of a step) falls on all of them alike."""
    from raymtl.train.trainer import make_trainer, prepare

    exp, infos = prepare(experiment(f"comm-g{groups}-{time.time_ns()}", data, args, tmp / "runs"))
    out = tmp / f"calls{groups}"
    out.mkdir()
    trainer = make_trainer(exp, infos)
    trainer.train_loop_per_worker = counting_collectives(trainer.train_loop_per_worker, str(out), args.modes,
                                                         round(args.bucket_mb * 2**20))
    trainer.fit()
    rank0 = json.loads((out / "rank0.json").read_text())
    steps = rank0["steps"]
    timed = [(b["mode"], b["t"] - a["t"]) for a, b in zip(steps, steps[1:])]  # a step: from the last sync's end to its own
    timed = timed[math.ceil(args.warmup * len(timed)) :]
    results = {}
    for mode in args.modes:
        own = [s for s in steps if s["mode"] == mode]
        result = {
            "groups": groups,
            "mode": mode,
            "steps": len(own),
            "allreduce_bytes_per_step": statistics.mean(s["bytes"] for s in own),
            "used_param_bytes_per_step": statistics.mean(s["used"] for s in own),
            "step_s": statistics.median(t for m, t in timed if m == mode),
            "other_allreduce_bytes": rank0["other_bytes"],
        }
        result["bytes_ratio"] = result["allreduce_bytes_per_step"] / result["used_param_bytes_per_step"]
        print(f"[comm] {json.dumps(result)}", flush=True)
        results[mode] = result
    return results


def run_groups(groups: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Every mode at `groups` task groups, on the same data; exposed communication = step_s - step_s(off)."""
    load_before = os.getloadavg()[0]
    rows = math.ceil(args.steps / groups) * args.batch_size * 2  # 2 workers
    data = frames(tmp / f"data{groups}", rows, args.image_size, TASKS[:groups])
    modes = run_modes(groups, data, args, tmp)
    result = {"groups": groups, "load": {"before": load_before, "after": os.getloadavg()[0]}, "modes": modes}
    if "off" in modes:
        result["exposed_comm_s"] = {m: r["step_s"] - modes["off"]["step_s"] for m, r in modes.items() if m != "off"}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4], choices=range(1, len(TASKS) + 1))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="gradient sync modes to run at every G (overlapped is always among them)")
    parser.add_argument("--steps", type=int, default=240,
                        help="steps of the epoch, the modes taking turns (rounded up to a multiple of G)")
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="CPUs of both workers together")
    parser.add_argument("--bucket-mb", type=float, default=BUCKET_BYTES / 2**20,
                        help="gradient bucket size in MiB (the library's default: DDP's 25)")
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of the steps left out of step_s")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--append", action="store_true",
                        help="keep the --json file's runs of other G (so each G can run as its own short command)")
    args = parser.parse_args(argv)
    if args.threads < 2:
        parser.error("--threads must be >= 2 (each of the 2 workers gets threads // 2)")
    args.modes = [m for m in MODES if m in {*args.modes, "overlapped"}]
    return args


def main(argv: list[str] | None = None) -> dict:
    from raymtl.ray_runtime import ensure_ray

    args = parse_args(argv)
    if args.append and not args.json:
        raise SystemExit("--append needs --json")
    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="raymtl_comm_") as tmp:
        runs = [run_groups(g, args, Path(tmp)) for g in args.groups]
    if args.append and args.json.exists():
        old = json.loads(args.json.read_text())
        same = ("modes", "steps", "batch_size", "image_size", "threads", "bucket_mb", "warmup")
        settings = {"bucket_mb": BUCKET_BYTES / 2**20, **old["settings"]}  # files from before --bucket-mb
        if any(settings.get(k) != getattr(args, k) for k in same):
            raise SystemExit(f"--append: {args.json} was measured with other settings ({same})")
        runs = sorted([r for r in old["runs"] if r["groups"] not in args.groups] + runs, key=lambda r: r["groups"])
    library = [r["modes"]["overlapped"] for r in runs]
    report = {
        "load": {"before_max": max(r["load"]["before"] for r in runs), "after_max": max(r["load"]["after"] for r in runs)},
        "settings": {**vars(args), "groups": [r["groups"] for r in runs], "json": str(args.json) if args.json else None,
                     "model": "resnet18 per group, 1 view, hidden 128, no text", "workers": 2, "backend": "gloo"},
        "groups": [r["groups"] for r in runs],
        "allreduce_bytes_per_step": [r["allreduce_bytes_per_step"] for r in library],
        "used_param_bytes_per_step": [r["used_param_bytes_per_step"] for r in library],
        "step_s": [r["step_s"] for r in library],
        "step_s_by_mode": {m: [r["modes"][m]["step_s"] for r in runs] for m in args.modes},
        "runs": runs,
    }
    exact = [r["modes"][m] for r in runs for m in ("before", "sequential", "overlapped") if m in r["modes"]]
    report["targets"] = {
        f"allreduce/used <= {TARGET_BYTES_RATIO}": {"value": max(r["bytes_ratio"] for r in exact),
                                                    "met": all(r["bytes_ratio"] <= TARGET_BYTES_RATIO for r in exact)},
    }
    by_g = {r["groups"]: r["step_s"] for r in library}
    if 1 in by_g and 4 in by_g:
        ratio = by_g[4] / by_g[1]
        report["targets"][f"step_s(G=4)/step_s(G=1) <= {TARGET_STEP_RATIO}"] = {"value": ratio, "met": ratio <= TARGET_STEP_RATIO}
    if "off" in args.modes:
        report["exposed_comm_s"] = {m: [r["exposed_comm_s"][m] for r in runs] for m in args.modes if m != "off"}
        g1 = next((r for r in runs if r["groups"] == 1), None)
        if g1 is not None and "before" in args.modes:
            ratio = g1["exposed_comm_s"]["overlapped"] / g1["exposed_comm_s"]["before"]
            report["targets"][f"exposed(overlapped)/exposed(before) at G=1 <= {TARGET_EXPOSED_RATIO}"] = {
                "value": ratio, "met": ratio <= TARGET_EXPOSED_RATIO}
        if g1 is not None and "sequential" in args.modes:
            report["overlap_alone"] = {"exposed(overlapped)/exposed(sequential) at G=1":
                                       g1["exposed_comm_s"]["overlapped"] / g1["exposed_comm_s"]["sequential"]}
    print(f"\n{'G':>2} {'mode':>10} {'all-reduced MB/step':>20} {'used MB/step':>13} {'ratio':>6} {'s/step':>7} {'exposed s':>9}")
    for r in runs:
        for mode, m in r["modes"].items():
            exposed = r.get("exposed_comm_s", {}).get(mode)
            print(f"{r['groups']:>2} {mode:>10} {m['allreduce_bytes_per_step'] / 2**20:>20.2f} "
                  f"{m['used_param_bytes_per_step'] / 2**20:>13.2f} {m['bytes_ratio']:>6.3f} {m['step_s']:>7.3f} "
                  f"{'' if exposed is None else f'{exposed:.3f}':>9}")
    for name, t in report["targets"].items():
        print(f"{name}: {t['value']:.3f} ({'met' if t['met'] else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
