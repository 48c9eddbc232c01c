"""The library's overlapped gradient sync against PyTorch DDP's on the same network: how much of the
exchange overlap can hide on this machine at all.

    python -m benchmarks.comm_ddp --json benchmarks/results/comm_ddp.json

Two processes (gloo over loopback, no Ray, one torch thread each), a torchvision resnet18 at 32 px,
batch 16, the modes taking turns step by step as in `benchmarks/comm.py`:

- `off`: forward and backward, then a one-element all-reduce (the steps start together);
- `sequential`: `GradSync(overlap=False)`, the buckets sent after backward, one after another;
- `overlapped`: `GradSync`, the library's sync, buckets launched from gradient hooks in backward;
- `ddp`: `DistributedDataParallel` (its C++ reducer, the same bucket size).

Per mode: rank 0's median step and its CPU time per step (all its threads, kernel time included);
exposed communication = step - `off` step. When DDP's overlap hides no more than the library's, what
is left exposed is the machine's, not the sync's: on 2 cores both workers' backward and gloo's copies
through the loopback sockets share the same two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

from raymtl.train.gradsync import BUCKET_BYTES, GradSync

MODES = ("off", "sequential", "overlapped", "ddp")


class _Tasked(nn.Module):
    """One network as a one-task model: what `GradSync` asks of a model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def parameters_for(self, task: str) -> list[nn.Parameter]:
        return list(self.net.parameters())


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(rank: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    ddp = nn.parallel.DistributedDataParallel(net, bucket_cap_mb=args.bucket_mb)
    syncs = {m: GradSync(_Tasked(net), round(args.bucket_mb * 2**20), overlap=m == "overlapped")
             for m in ("sequential", "overlapped")}
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(rank))
    steps = {m: [] for m in MODES}
    dist.barrier()
    wall, cpu = time.perf_counter(), _cpu_s()
    for i in range(args.steps):
        mode = MODES[i % len(MODES)]
        net.zero_grad(set_to_none=True)
        if mode == "ddp":
            ddp(images).square().mean().backward()
        elif mode == "off":
            net(images).square().mean().backward()
            dist.all_reduce(torch.zeros(1))
        else:
            syncs[mode].start("task", had_batch=True)
            net(images).square().mean().backward()
            syncs[mode].finish()
        now, now_cpu = time.perf_counter(), _cpu_s()
        steps[mode].append((now - wall, now_cpu - cpu))
        wall, cpu = now, now_cpu
    if rank == 0:
        Path(tmp, "steps.json").write_text(json.dumps(steps))
    dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="raymtl_comm_ddp_") as tmp:
        mp.spawn(_worker, args=(args, tmp), nprocs=2, join=True)
        steps = json.loads(Path(tmp, "steps.json").read_text())
    kept = {m: s[round(args.warmup * len(s)) :] for m, s in steps.items()}
    step_s = {m: statistics.median(w for w, _ in s) for m, s in kept.items()}
    exposed = {m: step_s[m] - step_s["off"] for m in MODES[1:]}
    return {
        "load": {"before": load_before, "after": os.getloadavg()[0]},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "steps_per_mode": {m: len(s) for m, s in kept.items()},
        "step_s": step_s,
        "cpu_s_per_step": {m: statistics.mean(c for _, c in s) for m, s in kept.items()},
        "exposed_comm_s": exposed,
        "exposed_ratio_to_sequential": {m: exposed[m] / exposed["sequential"] for m in ("overlapped", "ddp")},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240, help="steps in all, the modes taking turns")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--bucket-mb", type=float, default=BUCKET_BYTES / 2**20, help="bucket size (MiB), both syncs")
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of each mode's steps left out")
    parser.add_argument("--json", type=Path, help="append the run to this JSON file's runs")
    args = parser.parse_args(argv)
    if args.steps < 2 * len(MODES):
        parser.error(f"--steps must be >= {2 * len(MODES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = {"started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), **run(args)}
    print(f"{'mode':>10} {'s/step':>7} {'CPU s/step':>10} {'exposed s':>9} {'/ sequential':>12}")
    for m in MODES:
        exposed = result["exposed_comm_s"].get(m)
        ratio = result["exposed_ratio_to_sequential"].get(m)
        print(f"{m:>10} {result['step_s'][m]:>7.3f} {result['cpu_s_per_step'][m]:>10.3f} "
              f"{'' if exposed is None else f'{exposed:.3f}':>9} {'' if ratio is None else f'{ratio:.2f}':>12}")
    if args.json:
        runs = json.loads(args.json.read_text())["runs"] if args.json.exists() else []
        args.json.write_text(json.dumps({"benchmark": "comm_ddp", "runs": [*runs, result]}, indent=2))
    return result


if __name__ == "__main__":
    main()
