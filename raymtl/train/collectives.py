"""Collectives of the training loop (metric states, RNG states)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from raymtl.train.checkpoint import rng_state


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_rng() -> list[dict]:
    states = [rng_state()]
    if dist.is_available() and dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    return states


