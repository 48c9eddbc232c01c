"""What a sweep's trial reserves, and how many trials the cluster holds at once.

A one-worker trial on local storage trains inside the trial's own process (Ray Train's local mode,
as `raymtl.train.in_process` does for a command): Tune reserves exactly that worker's resources,
so a RUNNING trial is a training one, and fractional GPUs pack trials (`sweep.gpus_per_trial:
0.25` puts four ensemble members on one GPU). A trial of several workers runs a Train run, whose
worker group takes its own placement group outside the trial's (Ray Train V2); Tune then reserves
only the trial's small driver share, and the default `max_concurrent` counts the workers' bundles
so that every started trial's workers fit beside the others'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from raymtl import storage
from raymtl.config import ConfigError, Experiment, check_gpus_per_worker, worker_range

# A Train-run trial's own process only waits on its Train run, whose workers reserve their own CPUs.
TRIAL_DRIVER_CPUS = 0.25
# CPUs the default concurrency leaves free: Ray Data reads (and streams) the inputs beside the trials.
DATA_CPUS = 1.0

Bundle = dict[str, float]


def trains_in_trial(exp: Experiment) -> bool:
    """Whether a trial of `exp` trains in the trial's own process (see the module doc)."""
    tr = exp.training
    return worker_range(tr) == (1, 1) and tr.in_process != "never" and not storage.is_uri(storage.normalize(exp.storage_path))


def with_trial_gpus(exp: Experiment, gpus_per_trial: float | None) -> Experiment:
    """`exp` with each trial's `gpus_per_trial` GPUs split over its workers: a fraction only for one
    worker (`check_gpus_per_worker`; `SweepSpec.validate` calls this to refuse it with the config)."""
    if not gpus_per_trial:
        return exp
    tr = exp.training
    workers = worker_range(tr)[1]
    share = gpus_per_trial / workers
    check_gpus_per_worker(share, workers, f"sweep.gpus_per_trial ({gpus_per_trial:g} over a trial's {workers} workers)")
    return dataclasses.replace(exp, training=dataclasses.replace(tr, use_gpu=True, worker_resources={**tr.worker_resources, "GPU": share}))


def trial_bundles(exp: Experiment) -> list[Bundle]:
    """The resources a trial uses: its one in-trial worker, or its driver and its Train run's workers."""
    tr = exp.training
    worker: Bundle = {"CPU": tr.cpus_per_worker, **({"GPU": 1.0} if tr.use_gpu else {}), **tr.worker_resources}
    if trains_in_trial(exp):
        return [worker]
    return [{"CPU": TRIAL_DRIVER_CPUS}] + [worker] * worker_range(tr)[1]  # an elastic run: its most


def tune_resources(exp: Experiment) -> Bundle:
    """What Tune reserves for a trial: its worker (in-trial) or its driver's share (a Train run)."""
    return trial_bundles(exp)[0]


def concurrency(bundles: Sequence[Bundle], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many trials of `bundles` the `nodes` (each node's total resources) hold at once.

    One bundle (an in-trial worker) counts per node; several (a Train run) count against the
    cluster's totals. `DATA_CPUS` stay free when the cluster has more. A bundle no node can hold,
    or a trial larger than the cluster, is a `ConfigError`: that trial would wait forever.
    """
    for bundle in bundles:
        if not any(_fits(bundle, node) for node in nodes):
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise ConfigError(
                f"a trial needs {show(bundle)} on one node, and no node of the cluster has that "
                f"(the largest: {show({k: largest.get(k, 0) for k in bundle})}): it could never start; "
                "lower sweep.gpus_per_trial, training.cpus_per_worker or training.worker_resources"
            )
    spare = _spare(nodes)
    if len(bundles) == 1:
        count = sum(_times(bundles[0], node) for node in spare)
    else:
        total = _sum(bundles)
        count = _times(total, _sum(spare))
        if _times(total, _sum(nodes)) < 1:
            raise ConfigError(
                f"a trial needs {show(total)} in all and the cluster has {show({k: _sum(nodes).get(k, 0) for k in total})}: "
                "it could never start; use fewer training.num_workers or lower sweep.gpus_per_trial"
            )
    return max(1, count)


def cluster_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (Ray must be up)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _fits(bundle: Bundle, node: Mapping[str, float]) -> bool:
    return all(node.get(key, 0.0) + 1e-9 >= value for key, value in bundle.items() if value > 0)


def _times(bundle: Bundle, node: Mapping[str, float]) -> int:
    counts = [math.floor(node.get(key, 0.0) / value + 1e-9) for key, value in bundle.items() if value > 0]
    return min(counts) if counts else 0


def _spare(nodes: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """The nodes with `DATA_CPUS` taken off the first node that has more CPUs than that."""
    out, taken = [dict(n) for n in nodes], False
    for node in out:
        if not taken and node.get("CPU", 0.0) > DATA_CPUS:
            node["CPU"] -= DATA_CPUS
            taken = True
    return out


def _sum(nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            total[key] = total.get(key, 0.0) + value
    return total


def show(bundle: Mapping[str, float]) -> str:
    return ", ".join(f"{value:g} {key}" for key, value in bundle.items())
