"""Batches on a GPU: pinned, copied on a side stream by the background thread, normalised there; the
same numbers as on the CPU, and the training stream never reads a batch before its copy is done."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymtl.config import DataSpec
from raymtl.data.datasets import Decoded, DecodedCache, TaskInputs
from raymtl.data.device_inputs import DeviceInputs
from raymtl.data.plan import Step
from raymtl.train.batches import TaskBatches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches(device: str, steps: list[Step], cache: DecodedCache) -> list[dict[str, torch.Tensor]]:
    inputs = TaskInputs(preprocessors={}, sources={}, rows={}, max_bad_fraction=0.0)
    data = TaskBatches(inputs, "train", steps, DeviceInputs(DataSpec(), device), cache)
    out = []
    for _, batch in data:
        # a busy training stream: the batch must not be read before its side-stream copy is done
        busy = torch.randn(4096, 4096, device=batch["label"].device)
        for _ in range(20):
            busy = busy @ busy
            busy /= busy.norm()
        out.append({k: (v.sum(dim=tuple(range(1, v.dim()))) if v.dim() > 1 else v).cpu() for k, v in batch.items()})
    return out


def test_gpu_batches_equal_the_cpus_and_arrive_in_plan_order():
    rng = np.random.default_rng(0)
    n = 4096
    chunks = [("color.train", start, Decoded({
        "view_full": rng.integers(0, 256, (1024, 224, 224, 3), dtype=np.uint8),
        "label": np.arange(start, start + 1024, dtype=np.int64)}))
        for start in range(0, n, 1024)]
    cache = DecodedCache(chunks)
    order = rng.permutation(n)
    steps = [Step("color", order[i:i + 256]) for i in range(0, n, 256)]
    on_gpu = _batches("cuda", steps, cache)
    on_cpu = _batches("cpu", steps, cache)
    assert [b["label"].tolist() for b in on_gpu] == [s.rows.tolist() for s in steps]
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        torch.testing.assert_close(gpu["view_full"], cpu["view_full"], rtol=1e-5, atol=1e-2)
