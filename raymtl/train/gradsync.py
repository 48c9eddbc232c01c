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
ranks that had a batch (each rank divides its gradients by the world size as it copies them into
the bucket, and the sums are rescaled only in a step where some rank had no batch: no pass over
them after the reduction), a parameter no rank produced a gradient for keeps `grad=None` (so the
optimizer leaves it alone, as it would on one process: a zero gradient would still move it through
weight decay and momentum), and when no rank had a batch the step is skipped everywhere. Those
decisions need the flags on the host: they are read once per step, after the last bucket is waited
on, which is the step's only host synchronisation.

The buckets are cut from flat buffers kept from step to step (`_Buffers`), as DDP keeps its
buckets: on the host, a fresh buffer per step costs a page fault per 4 KiB page, several times
the copy into it. The averaged gradients are views of those buffers, so they are only valid until
the next step's `start`, which refuses to run while the previous step's gradients are still set
(the training loop drops them with `zero_grad(set_to_none=True)` first).

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


class _Buffers:
    """Flat buffers by (use, dtype, device), grown when a step needs more and otherwise reused."""

    def __init__(self) -> None:
        self.flat: dict[tuple, torch.Tensor] = {}

    def take(self, use: str, dtype: torch.dtype, device: torch.device, numel: int) -> torch.Tensor:
        key = (use, dtype, device)
        flat = self.flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self.flat[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat


class _Step:
    """One step's buckets, launched strictly in order, each once it and all earlier ones are complete.

    Bucket i goes out as `slots[i]`: its gradients, then one flag per parameter and the had-batch
    flag, at consecutive offsets of the `buffers`' wire buffer of its dtype."""

    def __init__(self, plan: list[list[nn.Parameter]], had_batch: bool, wire: torch.dtype | None,
                 buffers: _Buffers) -> None:
        self.plan, self.had_batch, self.wire, self.buffers = plan, had_batch, wire, buffers
        self.world = world_size()
        self.bucket_of = {p: i for i, bucket in enumerate(plan) for p in bucket}
        self.missing = [len(bucket) for bucket in plan]
        self.sent: list[tuple[torch.Tensor, Pending]] = []
        self.slots = self._slots("wire", wire, flags=True)

    def _slots(self, use: str, dtype: torch.dtype | None, flags: bool) -> list[torch.Tensor]:
        """A slot per bucket (its gradients, then its flags if `flags`), consecutive in the `use`
        buffer of its dtype: `dtype`, else the bucket's parameters'."""
        cuts, totals = [], {}
        for bucket in self.plan:
            key = (dtype or bucket[0].dtype, bucket[0].device)
            size = sum(p.numel() for p in bucket) + (len(bucket) + 1 if flags else 0)
            cuts.append((key, totals.get(key, 0), size))
            totals[key] = cuts[-1][1] + size
        flats = {key: self.buffers.take(use, *key, n) for key, n in totals.items()}
        return [flats[key][start : start + size] for key, start, size in cuts]

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
        bucket, flat = self.plan[len(self.sent)], self.slots[len(self.sent)]
        flags = flat[-len(bucket) - 1 :]
        flags.fill_(1.0 if self.had_batch else 0.0)  # device-side fills: no host-to-device copy of a list
        offset = 0
        for j, p in enumerate(bucket):
            if p.grad is None:
                _view(flat, offset, p).zero_()
                flags[j : j + 1].zero_()  # not `= 0.0`: on a GPU, a host-to-device copy that syncs
            else:
                torch.mul(p.grad, 1 / self.world, out=_view(flat, offset, p))
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
        reduced = [flat[: -len(bucket) - 1] for (flat, _), bucket in zip(self.sent, self.plan)]  # sums of grad / world
        averages = self._slots("values", None, flags=False) if self.wire else reduced  # in the parameters' dtype
        start = 0
        for total, values, bucket in zip(reduced, averages, self.plan):
            produced, start = counts[start : start + len(bucket)], start + len(bucket) + 1
            if values is not total:
                values.copy_(total)
            if contributors != self.world:  # some rank had no batch: average over those that had one
                values.mul_(self.world / contributors)
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
        self.buffers = _Buffers()
        self.given: list[tuple[nn.Parameter, torch.Tensor]] = []  # the last step's averages, views of the buffers

    def start(self, task: str, had_batch: bool) -> None:
        """Arm the hooks for `task`'s parameters (call before backward)."""
        self.had_batch = had_batch
        if world_size() == 1:
            return
        if any(p.grad is grad for p, grad in self.given):
            raise RuntimeError("the previous step's averaged gradients are still set, and this step reuses their "
                               "buffers: drop them before start (optimizer.zero_grad(set_to_none=True))")
        params = list(dict.fromkeys(p for p in self.model.parameters_for(task) if p.requires_grad))  # once each
        self.step = _Step(buckets(params[::-1], self.bucket_bytes), had_batch, self.wire, self.buffers)
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
        stepped = step.finish(sequential=not self.overlap)
        self.given = [(p, p.grad) for bucket in step.plan for p in bucket if p.grad is not None]
        return stepped
