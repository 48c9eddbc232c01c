"""Gradient sync and collectives on a real 2-process gloo group (no Ray): values by hand, bytes counted."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raymtl.train import collectives
from raymtl.train.gradsync import GradSync, buckets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class TwoGroups(nn.Module):
    """Stand-in for MultiTaskModel: task 'a' uses `a` and `unused_a` (which never gets a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)
        self.unused_a = nn.Parameter(torch.zeros(2))

    def parameters_for(self, task: str) -> list[nn.Parameter]:
        return [self.a.weight, self.unused_a] if task == "a" else [self.b.weight]


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    reduced: list[int] = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (reduced.append(t.numel()), real(t, *a, **k))[1]
    model, results = TwoGroups(), {}
    sync = GradSync(model)
    x = torch.tensor([[1.0, 2.0, 3.0]]) * (rank + 1)  # rank 0: x, rank 1: 2x

    model.a(x).sum().backward()  # d/dw = x on each rank
    results["both"] = (sync("a", had_batch=True), model.a.weight.grad.clone(), model.unused_a.grad, model.b.weight.grad)
    results["both_bytes"] = sum(reduced)

    model.zero_grad(set_to_none=True)
    if rank == 0:  # rank 1's batch was empty: it joins with nothing
        model.a(x).sum().backward()
    results["one"] = (sync("a", had_batch=rank == 0), model.a.weight.grad.clone())

    model.zero_grad(set_to_none=True)
    results["none"] = (sync("b", had_batch=False), model.b.weight.grad)

    results["gather"] = collectives.all_gather_bytes(b"r" * (rank + 3))
    results["rng"] = len(collectives.gather_rng())
    w = nn.Linear(2, 2)
    torch.nn.init.constant_(w.weight, float(rank))
    counter = torch.tensor([rank], dtype=torch.int64)
    collectives.broadcast_tensors([w.weight, counter], src=0)
    results["broadcast"] = (w.weight.clone(), counter.clone())
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "out")), nprocs=2, join=True)
    return [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(2)]


def test_gradients_of_the_task_are_averaged_and_unused_ones_stay_none(two_ranks):
    for res in two_ranks:
        stepped, grad, unused, other = res["both"]
        assert stepped
        assert torch.allclose(grad, torch.tensor([[1.5, 3.0, 4.5]]))  # (x + 2x) / 2
        assert unused is None and other is None  # no rank produced one / another task's


def test_only_the_task_parameters_are_reduced(two_ranks):
    # a.weight (3) + unused_a (2) + one flag per parameter (2) + the had-batch flag (1); never b
    assert all(res["both_bytes"] == 3 + 2 + 2 + 1 for res in two_ranks)


def test_a_rank_without_a_batch_joins_and_the_average_is_over_ranks_with_one(two_ranks):
    for res in two_ranks:
        stepped, grad = res["one"]
        assert stepped and torch.equal(grad, torch.tensor([[1.0, 2.0, 3.0]]))  # rank 0's alone


def test_no_batch_on_any_rank_skips_the_step_everywhere(two_ranks):
    assert all(res["none"] == (False, None) for res in two_ranks)


def test_gather_and_broadcast_collectives(two_ranks):
    for res in two_ranks:
        assert res["gather"] == [b"rrr", b"rrrr"]  # uneven payloads, rank order
        assert res["rng"] == 2
        weight, counter = res["broadcast"]
        assert torch.equal(weight, torch.zeros(2, 2)) and counter.item() == 0  # rank 0's, both dtypes


def test_buckets_split_by_size_and_dtype():
    params = [nn.Parameter(torch.zeros(n)) for n in (4, 4, 4)] + [nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    assert [len(b) for b in buckets(params, limit=32)] == [2, 1, 1]  # 16 + 16 bytes fit, then dtype change


def test_group_device_follows_the_backend(monkeypatch):
    """NCCL reduces CUDA tensors: the helper must target the current CUDA device under it."""
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.group_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert collectives.group_device() == torch.device("cpu")
