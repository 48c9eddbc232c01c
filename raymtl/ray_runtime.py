"""Joining or starting the Ray cluster a command runs on.

A local cluster on a laptop or a small box shares its cores with training, so raymtl starts it
lean: no dashboard (its head process and a dozen modules, ~200 MB and ~4 s of start-up), no usage
stats, no metrics export, and none of Ray Train's cloud services (the spot-preemption watcher, an
actor process of its own; Train's metrics callbacks). `--dashboard` (or RAYMTL_DASHBOARD=1) turns
the dashboard back on. A cluster that is joined keeps whatever it was started with. A command
(`command_session`) shuts down the local cluster it started when it ends, and leaves a joined one
running.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from raymtl import console

DASHBOARD_ENV = "RAYMTL_DASHBOARD"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

# Set for a local cluster unless the user set them: read by the processes Ray spawns.
LEAN_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats reporter
    "RAY_enable_metrics_collection": "0",  # no per-process metrics recording and export
    "RAY_TRAIN_METRICS_ENABLED": "0",  # no Train controller/worker metrics callbacks
    PREEMPTION_WATCHER_ENV: "0",  # no spot-preemption watcher actor: one box is not preempted
}


_started_here = False  # ensure_ray started a local cluster in this process


def dashboard_wanted() -> bool:
    return os.environ.get(DASHBOARD_ENV, "").lower() in ("1", "true", "yes")


def ensure_ray(address: str | None = None, *, dashboard: bool | None = None, num_cpus: int | None = None) -> None:
    """Join a running cluster (RAY_ADDRESS / `address`), else start a local one sized for data + training.

    Ray's own logging follows the console mode (`console.ray_logging`: quiet unless --verbose);
    `dashboard` None = RAYMTL_DASHBOARD; `num_cpus`: a local cluster's CPUs (default below).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    dashboard = dashboard_wanted() if dashboard is None else dashboard
    if address:
        context = ray.init(address=address, **console.ray_logging())
    else:
        global _started_here
        for key, value in LEAN_ENV.items():
            os.environ.setdefault(key, value)
        _started_here = True
        context = ray.init(
            address="local",
            # Decode tasks need CPU slots beside the training workers: at least 4 (logical ones on a small
            # box), else one per core. More than the cores start more decode tasks than can run: on a
            # 16-core H200 box with 32 slots streamed steps took 38 ms against 31 ms cached, and on 2
            # cores 4 decode processes spent 4 % more CPU per item than 2 (alternated epochs).
            num_cpus=num_cpus or max(4, usable_cpus()),
            include_dashboard=dashboard,
            **console.ray_logging(),
        )
    if dashboard and getattr(context, "dashboard_url", None):
        console.say(f"[raymtl] Ray dashboard: http://{context.dashboard_url}")


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity and its container's CPU quota (which Ray's own
    default reads). `os.cpu_count()` counts the host's: in a 2-CPU container on a 64-core host a local
    cluster would offer 64 decode slots for 2 cores."""
    from ray._private.utils import get_num_cpus

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, int(get_num_cpus())))


def started_here() -> bool:
    """Whether the running cluster is a local one `ensure_ray` started in this command."""
    import ray

    return _started_here and ray.is_initialized()


def release() -> None:
    """Shut down the local cluster `ensure_ray` started in this command (a joined one stays)."""
    global _started_here
    if _started_here:
        import ray

        _started_here = False
        ray.shutdown()


@contextlib.contextmanager
def command_session() -> Iterator[None]:
    """A command's span: a local cluster `ensure_ray` started inside it is shut down when it ends
    (success or failure); a joined cluster, or one started before, is left running."""
    global _started_here
    _started_here = False
    try:
        yield
    finally:
        release()
