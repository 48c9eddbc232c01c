"""Data-parallel gradient averaging of exactly the parameters a step's task used.

Every rank runs the same task at every step (the shared `TaskSchedule`), so the parameters the
step touches are known from the task alone: `MultiTaskModel.parameters_for(task)`. Only their
gradients are all-reduced, coalesced into flat buckets, so a step of one group's task moves that
group's backbone (plus the shared text encoder if the task reads text), never the other groups'.
DDP over the whole model would all-reduce every group's (zero) gradients at every step.

A rank whose batch was empty (rows dropped as bad images) still joins with zero gradients. With
each bucket goes one flag per parameter (had a gradient on this rank) and one per rank (had a
batch): the average divides by the ranks that had a batch, a parameter no rank produced a
gradient for keeps `grad=None` (so the optimizer leaves it alone, as it would on one process),
and when no rank had a batch the step is skipped everywhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from raymtl.models.multitask import MultiTaskModel
from raymtl.train.collectives import all_reduce_sum, world_size

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def buckets(params: list[nn.Parameter], limit: int = BUCKET_BYTES) -> list[list[nn.Parameter]]:
    """Consecutive runs of `params` of one dtype, each at most `limit` bytes (or one parameter)."""
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not out or size + nbytes > limit or out[-1][0].dtype != p.dtype:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


class GradSync:
    """Call after `backward()`: averages the task's gradients over ranks; world size 1 does nothing."""

    def __init__(self, model: MultiTaskModel, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.model, self.bucket_bytes = model, bucket_bytes

    @torch.no_grad()
    def __call__(self, task: str, had_batch: bool) -> bool:
        """Whether any rank had a batch (when none had, every rank skips the optimizer step)."""
        if world_size() == 1:
            return had_batch
        params = [p for p in self.model.parameters_for(task) if p.requires_grad]
        contributors = 0.0
        for bucket in buckets(params, self.bucket_bytes):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flags = torch.tensor([p.grad is not None for p in bucket] + [had_batch], dtype=grads[0].dtype,
                                 device=grads[0].device)
            flat = all_reduce_sum(torch.cat([_flatten_dense_tensors(grads), flags]))
            *produced, contributors = flat[-len(flags) :].tolist()  # one host sync per bucket
            if not contributors:
                continue
            for p, g, made in zip(bucket, _unflatten_dense_tensors(flat[: -len(flags)], bucket), produced):
                p.grad = g.div_(contributors) if made else None
        if not contributors:
            for p in params:
                p.grad = None
        return bool(contributors)
