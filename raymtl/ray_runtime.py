"""Joining or starting the Ray cluster a command runs on.

A local cluster on a laptop or a small box shares its cores with training, so raymtl starts it
lean: no dashboard (its head process and a dozen modules, ~200 MB and ~4 s of start-up), no usage
stats, no metrics export, and none of Ray Train's cloud services (the spot-preemption watcher, an
actor process of its own; Train's metrics callbacks). `--dashboard` (or RAYMTL_DASHBOARD=1) turns the dashboard back on. A
cluster that is joined keeps whatever it was started with.
"""

from __future__ import annotations

import os

from raymtl import console

DASHBOARD_ENV = "RAYMTL_DASHBOARD"

# Set for a local cluster unless the user set them: read by the processes Ray spawns.
LEAN_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats reporter
    "RAY_enable_metrics_collection": "0",  # no per-process metrics recording and export
    "RAY_TRAIN_METRICS_ENABLED": "0",  # no Train controller/worker metrics callbacks
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no spot-preemption watcher actor: one box is not preempted
}


def dashboard_wanted() -> bool:
    return os.environ.get(DASHBOARD_ENV, "").lower() in ("1", "true", "yes")


def ensure_ray(address: str | None = None, *, dashboard: bool | None = None) -> None:
    """Join a running cluster (RAY_ADDRESS / `address`), else start a local one sized for data + training.

    Ray's own logging follows the console mode (`console.ray_logging`: quiet unless --verbose);
    `dashboard` None = RAYMTL_DASHBOARD.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **console.ray_logging())
        return
    for key, value in LEAN_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        # Ray Data needs CPU slots beside the training workers; on a small box give it logical ones.
        num_cpus=max(4, 2 * (os.cpu_count() or 1)),
        include_dashboard=dashboard_wanted() if dashboard is None else dashboard,
        **console.ray_logging(),
    )
