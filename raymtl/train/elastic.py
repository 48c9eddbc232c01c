"""A run whose world changes: fresh RNG streams for new ranks, one line and one metrics row per
resize or recovery, and a checkpoint as soon as Ray Train says a node is about to be preempted.

The exact continuation itself is the plan's (`raymtl.data.plan.epoch_plan`) and the position's
(`raymtl.train.checkpoint.resume_position`); this module is what the loop does around it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import zlib

import numpy as np
import torch

from raymtl.train.checkpoint import Position, set_rng_state

logger = logging.getLogger("raymtl")

ROWS_ENV = "RAYMTL_TEST_ROW_LOG"  # tests: a folder where every rank logs the rows of each step it trains


def restore_rng(states: list[dict], *, seed: int, epoch: int, rank: int, world: int) -> None:
    """Rank `rank`'s saved RNG state; a rank the checkpoint had no state for (the world grew) gets
    a fresh stream seeded by (seed, epoch, rank, world), never another rank's copy."""
    if rank < len(states):
        set_rng_state(states[rank])
        return
    fresh = zlib.crc32(f"{seed}:{epoch}:{rank}:{world}".encode())
    torch.manual_seed(fresh)
    np.random.seed(fresh)
    random.seed(fresh)


def resumed_event(position: Position, old_world: int, world: int) -> dict:
    """The metrics row of a resize (the world changed) or a recovery (restarted on the same world)."""
    kind = "resize" if old_world != world else "recovery"
    return {"event": kind, "old_world": old_world, "world": world, "epoch": position.epoch,
            "step": position.step, "global_step": position.global_step, "samples": position.samples,
            "time": time.time()}


def describe(event: dict) -> str:
    """The event's console line."""
    where = f"epoch {event['epoch'] + 1} step {event['step']} (global step {event['global_step']})"
    if event["event"] == "resize":
        return f"[raymtl] resized {event['old_world']} -> {event['world']} workers: continuing {where}"
    if event["event"] == "preemption":
        return f"[raymtl] a node of the run is about to be preempted: checkpoint at {where}"
    return f"[raymtl] recovered on {event['world']} workers from the checkpoint at {where}"


def record(position: Position, event: dict, files) -> None:
    """`event` in the position (so checkpoints keep it), on the console and in metrics.jsonl (rank 0's `files`)."""
    position.events.append(event)
    if files is not None:
        logger.warning(describe(event))
        files.log_events(position.history, position.events)


def noticed(position: Position, world: int, files) -> None:
    """A preemption notice: recorded before the checkpoint it triggers."""
    record(position, {"event": "preemption", "world": world, "epoch": position.epoch, "step": position.step,
                      "global_step": position.global_step, "samples": position.samples, "time": time.time()}, files)


def preemption_notice(every: int, global_step: int, noticed: bool) -> bool:
    """Whether Ray Train reports an imminent preemption of one of the run's nodes, asked every
    `every` steps (the question is a barrier of all ranks, so every rank asks at the same steps;
    the loop asks only when the driver saw Ray Train's watcher on, `trainer.watches_preemption`).
    Once noticed, the answer stays yes until the worker group is restarted."""
    if noticed or not every or global_step % every:
        return noticed
    import ray.train

    return ray.train.get_preemption_info() is not None


def log_rows(epoch: int, position: Position, at: int, rank: int, world: int, task: str, rows: np.ndarray,
             lr: float) -> None:
    """Tests: this rank's rows of the step just taken (`ROWS_ENV`), the global samples before it
    (`at`) and the LR it used."""
    folder = os.environ.get(ROWS_ENV)
    if not folder:
        return
    line = {"t": time.time_ns(), "epoch": epoch, "g": position.global_step, "at": at,
            "rank": rank, "world": world, "task": task, "rows": rows.tolist(), "lr": lr}
    with open(os.path.join(folder, f"rows-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def log_resume(global_step: int) -> None:
    """Tests: a worker group resumed at `global_step` (`ROWS_ENV`): steps logged after it are redone."""
    folder = os.environ.get(ROWS_ENV)
    if folder:
        with open(os.path.join(folder, f"rows-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps({"t": time.time_ns(), "resume": global_step}) + "\n")
