"""Which ATen operations a piece of code runs, to check from a CPU run what it would do on a GPU: make
a tensor of a Python value (written into a GPU tensor, a host-to-device copy that waits for the
device) or read a value back into Python (`float(t)`, `.item()`: a sync with the device)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class Ops(TorchDispatchMode):
    """Counts the operations run inside it, by operation."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def host_values(self) -> int:
        return self.count[aten.lift_fresh.default]

    @property
    def host_reads(self) -> int:  # `item` under inference mode, `_local_scalar_dense` outside it
        return self.count[aten.item.default] + self.count[aten._local_scalar_dense.default]
