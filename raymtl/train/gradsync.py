"""Data-parallel gradient averaging of exactly the parameters a step's task used, overlapped with backward.

Every rank runs the same task at every step (the shared `TaskSchedule`), so the parameters the
step touches are known from the task alone: `MultiTaskModel.parameters_for(task)`. Only their
gradients are all-reduced, coalesced into flat buckets, so a step of one group's task moves that
group's backbone (plus the shared text encoder if the task reads text), never the other groups'.
DDP over the whole model would all-reduce every group's (zero) gradients at every step.

Overlap, as DDP's reducer does it: the buckets hold the step's parameters in reverse order (the
order backward produces their gradients), and a post-accumulate-grad hook per parameter counts
what is ready; a bucket is launched (an asynchronous all-reduce) as soon as it and every earlier
bucket are complete, so the reductions run while backward computes the rest. Collectives must be
issued in the same order on every rank, and a rank whose batch was empty runs no backward: its
hooks never fire, and `finish` launches whatever is left, in bucket order. Hooks act only between
`start` and `finish`, and only for that step's parameters (other backward passes, such as the
affinity measurement's, are left alone).

A rank whose batch was empty still joins with zero gradients. With each bucket goes one flag per
parameter (had a gradient on this rank) and one per rank (had a batch): the average divides by the
ranks that had a batch, a parameter no rank produced a gradient for keeps `grad=None` (so the
optimizer leaves it alone, as it would on one process: a zero gradient would still move it through
weight decay and momentum), and when no rank had a batch the step is skipped everywhere. Those
decisions need the flags on the host: they are read once per step, after the last bucket is waited
on, which is the step's only host synchronisation.

`compression="bf16"` sends the buckets as bf16 (half the bytes) and casts the sums back to the
parameters' dtype; the flags stay exact (integers up to 256 are exact in bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from raymtl.models.multitask import MultiTaskModel
from raymtl.train.collectives import Pending, all_reduce_sum_async, world_size

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size
COMPRESSIONS = {"none": None, "bf16": torch.bfloat16}  # training.grad_compression -> dtype on the wire
MAX_BF16_RANKS = 256  # the flags' sums are exact in bf16 up to here


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


def _view(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """`p`'s slot in `flat`, with `p`'s own strides (channels_last weights get channels_last gradients)."""
    return flat[offset : offset + p.numel()].as_strided(p.shape, p.stride())


class _Step:
    """One step's buckets, launched strictly in order, each once it and all earlier ones are complete."""

    def __init__(self, plan: list[list[nn.Parameter]], had_batch: bool, wire: torch.dtype | None) -> None:
        self.plan, self.had_batch, self.wire = plan, had_batch, wire
        self.bucket_of = {p: i for i, bucket in enumerate(plan) for p in bucket}
        self.missing = [len(bucket) for bucket in plan]
        self.sent: list[tuple[torch.Tensor, Pending]] = []

    def ready(self, p: nn.Parameter) -> None:
        """`p`'s gradient is accumulated: launch every bucket that is now complete, in order."""
        i = self.bucket_of.get(p)
        if i is None:
            return  # not this step's parameter
        if i < len(self.sent):
            raise RuntimeError("a gradient arrived after its bucket was sent: one backward per step with GradSync")
        self.missing[i] -= 1
        while len(self.sent) < len(self.plan) and not self.missing[len(self.sent)]:
            self.launch()

    @torch.no_grad()
    def launch(self) -> None:
        """All-reduce the next bucket asynchronously: gradients (zeros where none), flags, had-batch flag."""
        bucket = self.plan[len(self.sent)]
        n = sum(p.numel() for p in bucket)
        flat = torch.empty(n + len(bucket) + 1, dtype=self.wire or bucket[0].dtype, device=bucket[0].device)
        flags = flat[n:]
        flags.fill_(1.0 if self.had_batch else 0.0)  # device-side fills: no host-to-device copy of a list
        offset = 0
        for j, p in enumerate(bucket):
            if p.grad is None:
                _view(flat, offset, p).zero_()
                flags[j] = 0.0
            else:
                _view(flat, offset, p).copy_(p.grad)
            offset += p.numel()
        self.sent.append((flat, all_reduce_sum_async(flat)))

    @torch.no_grad()
    def finish(self, sequential: bool) -> bool:
        """Launch what backward left (everything on a rank without a batch), wait, set the averages."""
        while len(self.sent) < len(self.plan):
            self.launch()
            if sequential:
                self.sent[-1][1].wait()
        for _, pending in self.sent:
            pending.wait()
        if not self.plan:
            return False
        counts = torch.cat([flat[-len(bucket) - 1 :] for (flat, _), bucket in zip(self.sent, self.plan)])
        counts = counts.tolist()  # the step's one host sync, after the last reduction
        contributors = counts[len(self.plan[0])]  # every bucket carries the same had-batch sum
        if not contributors:
            for bucket in self.plan:
                for p in bucket:
                    p.grad = None
            return False
        start = 0
        for (flat, _), bucket in zip(self.sent, self.plan):
            produced, start = counts[start : start + len(bucket)], start + len(bucket) + 1
            values = flat[: -len(bucket) - 1].to(bucket[0].dtype).div_(contributors)
            offset = 0
            for p, made in zip(bucket, produced):
                p.grad = _view(values, offset, p) if made else None
                offset += p.numel()
        return True


class GradSync:
    """Averages the task's gradients over ranks, overlapped with backward; world size 1 does nothing.

    Per step: `start(task, had_batch)` before backward, `finish()` after it; `finish` says whether
    any rank had a batch (when none had, every rank skips the optimizer step). `overlap=False`
    sends the buckets one after another after backward (the sync that overlap replaced, kept for
    the comparison in `benchmarks/comm.py`).
    """

    def __init__(self, model: MultiTaskModel, bucket_bytes: int = BUCKET_BYTES, compression: str = "none",
                 overlap: bool = True) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"grad compression {compression!r}: expected one of {list(COMPRESSIONS)}")
        if compression == "bf16" and world_size() > MAX_BF16_RANKS:
            raise ValueError(f"bf16 gradient compression counts ranks exactly up to {MAX_BF16_RANKS}, "
                             f"not {world_size()}")
        self.model, self.bucket_bytes, self.wire, self.overlap = model, bucket_bytes, COMPRESSIONS[compression], overlap
        self.hooked: set[int] = set()  # ids of the parameters carrying this sync's hook
        self.step: _Step | None = None
        self.had_batch = False

    def start(self, task: str, had_batch: bool) -> None:
        """Arm the hooks for `task`'s parameters (call before backward)."""
        self.had_batch = had_batch
        if world_size() == 1:
            return
        params = list(dict.fromkeys(p for p in self.model.parameters_for(task) if p.requires_grad))  # once each
        self.step = _Step(buckets(params[::-1], self.bucket_bytes), had_batch, self.wire)
        if self.overlap:
            for p in params:
                if id(p) not in self.hooked:  # once per parameter; the hook is idle outside a step
                    p.register_post_accumulate_grad_hook(self._ready)
                    self.hooked.add(id(p))

    def _ready(self, p: nn.Parameter) -> None:
        if self.step is not None:
            self.step.ready(p)

    def finish(self) -> bool:
        """Wait for the averaged gradients; whether any rank had a batch (else every rank skips the step)."""
        if world_size() == 1:
            return self.had_batch
        step, self.step = self.step, None
        return step.finish(sequential=not self.overlap)
