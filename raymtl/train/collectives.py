"""Every collective of the training loop, through one helper that puts tensors on the group's device.

NCCL reduces CUDA tensors only and gloo CPU tensors only; a tensor on the wrong device fails (or,
for gloo with CUDA tensors, silently stages through the host). So nothing in raymtl calls
`torch.distributed` directly: `collective(op, tensor)` moves the tensor to `group_device()`,
issues the op there (synchronous, or asynchronous for the gradient buckets) and, on `wait()`,
copies the result back into the caller's tensor. With world size 1 (or no process group) every
function here is a no-op that returns its input.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from raymtl.train.checkpoint import rng_state


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def group_device() -> torch.device:
    """The device the default process group's backend reduces on: the current CUDA device for NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Pending:
    """A collective issued by `collective`: `wait()` completes it and returns the caller's tensor,
    which then holds the result (copied back when the tensor had to move)."""

    def __init__(self, work: dist.Work | None, moved: torch.Tensor, tensor: torch.Tensor) -> None:
        self.work, self.moved, self.tensor = work, moved, tensor

    def wait(self) -> torch.Tensor:
        if self.work is not None:  # issued with async_op=True: under NCCL this orders the current stream after it
            self.work.wait()
            self.work = None
        if self.moved is not self.tensor:
            self.tensor.copy_(self.moved)
            self.moved = self.tensor
        return self.tensor


def collective(op: Callable[[torch.Tensor], dist.Work | None], tensor: torch.Tensor) -> Pending:
    """Issue `op` (an in-place torch.distributed collective) on `tensor` moved to the group's device.

    `op` may be asynchronous (`async_op=True`, returning its work handle); the result lands in
    `tensor` itself once the returned `Pending` is waited on.
    """
    device = group_device()
    moved = tensor if tensor.device == device else tensor.to(device)
    return Pending(op(moved), moved, tensor)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place."""
    if world_size() > 1:
        collective(lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM), t).wait()
    return t


def all_reduce_sum_async(t: torch.Tensor) -> Pending:
    """Start summing `t` over ranks, in place; the sum is in `t` after `wait()` (world size > 1 only)."""
    return collective(lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM, async_op=True), t)


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` (parameters, buffers) with rank `src`'s values: one flat buffer per dtype."""
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        with torch.no_grad():
            flat = _flatten_dense_tensors([t.data for t in same])
            collective(lambda x: dist.broadcast(x, src=src), flat).wait()
            for t, value in zip(same, _unflatten_dense_tensors(flat, same)):
                t.data.copy_(value)


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's `payload`, in rank order (two all-reduces of uint8/int64 tensors, no pickled objects in torch)."""
    world, rank = world_size(), dist.get_rank() if world_size() > 1 else 0
    if world == 1:
        return [payload]
    sizes = torch.zeros(world, dtype=torch.int64)
    sizes[rank] = len(payload)
    all_reduce_sum(sizes)
    offsets = [0, *torch.cumsum(sizes, 0).tolist()]
    # Ranks fill disjoint slices of one zero buffer, so a sum is a gather (gloo and NCCL both sum uint8).
    buffer = torch.zeros(offsets[-1], dtype=torch.uint8)
    buffer[offsets[rank] : offsets[rank + 1]] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    all_reduce_sum(buffer)
    data = buffer.numpy().tobytes()
    return [data[offsets[r] : offsets[r + 1]] for r in range(world)]


def gather_rng() -> list[dict]:
    """Every rank's RNG states (CPU and CUDA), in rank order, for the checkpoint."""
    out = io.BytesIO()
    torch.save(rng_state(), out)
    return [torch.load(io.BytesIO(b), weights_only=False) for b in all_gather_bytes(out.getvalue())]
