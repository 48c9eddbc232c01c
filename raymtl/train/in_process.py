"""Training in the driver's own process: Ray Train's local mode, for one worker on a local machine.

A Train run on a laptop or a small box pays for processes that one worker does not need: a Train
controller, a worker actor importing torch again, placement groups, and a Ray cluster whose
background processes share the cores with the model. Ray Train's local mode
(`ScalingConfig(num_workers=0)`) runs the same training function right here instead; a Ray
cluster starts only when the data must stream, or is decoded in parallel first
(`datasets.needs_ray`). What the Train controller would do for the run is done here: resuming from
the run folder's newest checkpoint, retrying a failed attempt up to `max_failures` times, keeping
the best `keep_checkpoints` checkpoints and naming the best.

`training.in_process`: "auto" trains here when the run has one worker, no cluster to join (no
address, no RAY_ADDRESS, no Ray this process joined) and a local run folder; "always" insists (a clear error when it cannot); "never" keeps Ray Train's workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from raymtl import console, storage
from raymtl.config import ConfigError, Experiment, worker_range
from raymtl.train.checkpoint import CHECKPOINT_METRICS_FILE, best_of, newest_checkpoint


def trains_in_process(exp: Experiment, address: str | None) -> bool:
    """Whether `exp` trains in this process (see the module docstring)."""
    tr = exp.training
    if tr.in_process == "never":
        return False
    joins = address or os.environ.get("RAY_ADDRESS") or joined_cluster()
    remote = storage.is_uri(storage.normalize(exp.storage_path))
    if tr.in_process == "always":
        if joins:
            raise ConfigError(f"training.in_process: always trains in this process; it cannot join cluster {joins!r}")
        if remote:
            raise ConfigError(f"training.in_process: always needs a local storage_path, not {exp.storage_path!r}")
        return True
    return worker_range(tr) == (1, 1) and not joins and not remote


def joined_cluster() -> str | None:
    """The address of the Ray cluster this process joined, None when it is not connected or started
    the cluster itself (`ray.init()` here, `ensure_ray`'s local one): a notebook that joined a
    cluster (or a sweep running on one) trains on its workers."""
    import sys

    ray = sys.modules.get("ray")  # not imported: not connected to anything
    if ray is None or not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and node.head:  # this process started the cluster's head: a local one
        return None
    return ray.get_runtime_context().gcs_address


@dataclass(frozen=True)
class Retention:
    """Ray Train's `CheckpointConfig` rules, applied to a run folder: keep the `keep` best by
    `metric` (the newest when there is no metric), and always the latest."""

    keep: int
    metric: str | None
    mode: str

    def checkpoints(self, run_dir: str) -> list[tuple[Path, dict]]:
        """(folder, reported metrics) of the run's checkpoints, oldest first."""
        found = []
        for folder in sorted(Path(run_dir).glob("checkpoint_*")):
            file = folder / CHECKPOINT_METRICS_FILE
            if file.is_file():
                found.append((folder, json.loads(file.read_text())))
        return found

    def ranked(self, found: list[tuple[Path, dict]]) -> list[Path]:
        """The folders of `found` (`checkpoints`), best first, a NaN or missing score last; among equal
        scores the newer first, as Ray Train keeps them. A mid-epoch checkpoint ties with no evaluated
        one: it scores the worst possible."""
        if self.metric is None:
            return [folder for folder, _ in reversed(found)]
        sign = 1 if self.mode == "min" else -1

        def key(item: tuple[int, tuple[Path, dict]]) -> tuple[bool, float, int]:
            i, (_, metrics) = item
            score = float(metrics.get(self.metric, math.nan))
            return math.isnan(score), 0.0 if math.isnan(score) else sign * score, -i

        return [folder for _, (folder, _) in sorted(enumerate(found), key=key)]

    def prune(self, run_dir: str) -> None:
        """Delete the checkpoints neither among the `keep` best nor the latest."""
        found = self.checkpoints(run_dir)
        if len(found) <= self.keep:
            return
        kept = {*self.ranked(found)[: self.keep], found[-1][0]}
        for folder, _ in found:
            if folder not in kept:
                shutil.rmtree(folder, ignore_errors=True)

    def best(self, run_dir: str) -> str | None:
        """The best checkpoint by `metric` (`checkpoint.best_of`, as for a Ray Train run); None without a
        metric (no validation data) or a checkpoint scored."""
        best = best_of(self.checkpoints(run_dir), self.metric, self.mode) if self.metric else None
        return None if best is None else str(best)


def fit_in_process(exp: Experiment, config: dict, retention: Retention):
    """Run the loop here (Ray Train local mode) with `config` (`trainer.loop_config`), retried from
    the newest checkpoint on failure.

    Returns Ray Train's `Result`; a failure past `max_failures` raises `WorkerGroupError`, as a
    failed worker group would.
    """
    from ray.train import ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from raymtl.train.failures import is_permanent
    from raymtl.train.trainer import train_loop_per_worker

    run_dir = config["run_dir"]
    attempts = exp.training.max_failures
    quiet = not console.is_verbose()
    if quiet:  # "running in local mode", "reported metrics" at every report: Ray's INFO lines
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    failures = 0
    while True:
        trainer = TorchTrainer(train_loop_per_worker, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=0))
        try:
            return trainer.fit()
        except Exception as error:  # noqa: BLE001 -- a worker's failure, handled as Ray Train would
            failures += 1
            if 0 <= attempts < failures or is_permanent(error):  # the same data or config fails the same way
                raise WorkerGroupError(f"the in-process run failed: {error!r}", {0: error}) from error
            console.log_error(error)
            console.say(f"[raymtl] attempt {failures} failed ({console.root_cause(error)!r}); "
                        "resuming from the newest checkpoint")
            config = {**config, "resume_from": newest_checkpoint(run_dir)}
