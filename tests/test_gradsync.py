"""Gradient sync and collectives on a real 2-process gloo group (no Ray): values by hand, bytes counted."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ops import Ops
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


class Deep(nn.Module):
    """Task 'deep': four layers (several buckets at a small bucket size); task 'side': one more layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on both ranks
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        self.side = nn.Linear(4, 2)

    def parameters_for(self, task: str) -> list[nn.Parameter]:
        return list(self.layers.parameters()) if task == "deep" else list(self.side.parameters())


class Conv(nn.Module):
    """One channels_last convolution: its gradient must come back in that layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)

    def parameters_for(self, task: str) -> list[nn.Parameter]:
        return list(self.conv.parameters())


def _step(model: nn.Module, sync: GradSync, task: str, loss_fn, trace: dict) -> bool:
    """One step as the training loop runs it; `trace["backward"]` is True while backward runs."""
    model.zero_grad(set_to_none=True)
    sync.start(task, had_batch=loss_fn is not None)
    if loss_fn is not None:
        trace["backward"] = True
        loss_fn().backward()
        trace["backward"] = False
    return sync.finish()


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    reduced: list[tuple[int, torch.dtype, bool]] = []  # (numel, dtype, issued while backward ran)
    trace = {"backward": False}
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (reduced.append((t.numel(), t.dtype, trace["backward"])), real(t, *a, **k))[1]
    model, results = TwoGroups(), {}
    sync = GradSync(model)
    x = torch.tensor([[1.0, 2.0, 3.0]]) * (rank + 1)  # rank 0: x, rank 1: 2x

    results["both"] = (_step(model, sync, "a", lambda: model.a(x).sum(), trace), model.a.weight.grad.clone(),
                       model.unused_a.grad, model.b.weight.grad)  # d/dw = x on each rank
    results["both_bytes"] = sum(n for n, _, _ in reduced)

    # rank 1's batch was empty: it joins with nothing
    results["one"] = (_step(model, sync, "a", (lambda: model.a(x).sum()) if rank == 0 else None, trace),
                      model.a.weight.grad.clone())
    results["none"] = (_step(model, sync, "b", None, trace), model.b.weight.grad)

    # No Python value reaches the buckets: unused_a gets no gradient, rank 1 no batch (every flag 0).
    with Ops() as ops:
        _step(model, sync, "a", (lambda: model.a(x).sum()) if rank == 0 else None, trace)
    results["host_values"] = ops.host_values

    # Hooks act only for the step's parameters: b carries a hook (its own step), then a step of
    # task 'a' whose loss also reaches b leaves b's gradient local and sends only a's bucket.
    _step(model, sync, "b", lambda: model.b(x).sum(), trace)
    del reduced[:]
    _step(model, sync, "a", lambda: model.a(x).sum() + model.b(x).sum(), trace)
    results["foreign"] = (model.b.weight.grad.clone(), [n for n, _, _ in reduced])

    # The buckets' buffers are kept from step to step, so the last step's averages must be dropped first.
    grads = []
    for _ in range(2):  # the first step's averages held on to: without reuse their memory could not be reused
        _step(model, sync, "a", lambda: model.a(x).sum(), trace)
        grads.append(model.a.weight.grad)
    try:
        sync.start("a", had_batch=True)
        results["stale"] = None
    except RuntimeError as e:
        results["stale"] = str(e)
    results["reused"] = grads[0].data_ptr() == grads[1].data_ptr()

    # Several buckets: the same launch order on both ranks; rank 1 has no batch (no hooks fire).
    deep = Deep()
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank))
    for name, kwargs in (("overlap", {}), ("sequential", {"overlap": False}), ("bf16", {"compression": "bf16"})):
        del reduced[:]
        deep_sync = GradSync(deep, bucket_bytes=40 * 4, **kwargs)
        loss = (lambda: deep.layers(inputs).square().mean()) if rank == 0 or name == "bf16" else None
        stepped = _step(deep, deep_sync, "deep", loss, trace)
        results[name] = (stepped, list(reduced), {k: p.grad.clone() for k, p in deep.layers.named_parameters()})
    results["local"] = _local_grads(deep, inputs)

    conv = Conv()
    torch.nn.init.constant_(conv.conv.weight, 0.1)
    image = torch.ones(1, 2, 5, 5).to(memory_format=torch.channels_last) * (rank + 1)
    _step(conv, GradSync(conv), "conv", lambda: conv.conv(image).sum(), trace)
    results["layout"] = (conv.conv.weight.stride(), conv.conv.weight.grad.stride(), conv.conv.weight.grad.clone())

    results["gather"] = collectives.all_gather_bytes(b"r" * (rank + 3))
    results["rng"] = len(collectives.gather_rng())
    w = nn.Linear(2, 2)
    torch.nn.init.constant_(w.weight, float(rank))
    counter = torch.tensor([rank], dtype=torch.int64)
    collectives.broadcast_tensors([w.weight, counter], src=0)
    results["broadcast"] = (w.weight.clone(), counter.clone())
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def _local_grads(model: Deep, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.layers(inputs).square().mean().backward()
    return {k: p.grad.clone() for k, p in model.layers.named_parameters()}


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


def test_a_step_writes_no_python_value_into_the_buckets(two_ranks):
    """On a GPU each would be a host-to-device copy that waits for the device, inside backward."""
    assert [res["host_values"] for res in two_ranks] == [0, 0]


def test_hooks_act_only_for_the_step_parameters(two_ranks):
    for rank, res in enumerate(two_ranks):
        b_grad, sizes = res["foreign"]
        assert torch.equal(b_grad, torch.tensor([[1.0, 2.0, 3.0]]) * (rank + 1))  # this rank's own, not averaged
        assert sizes == [3 + 2 + 2 + 1]  # task a's one bucket


def test_buckets_go_out_in_one_order_on_every_rank_during_backward(two_ranks):
    """Reverse parameter order in 160-byte buckets: (fc3 bias, weight, fc2 bias), (fc2 weight), (fc1 bias, weight)."""
    orders = [[(n, dtype) for n, dtype, _ in res["overlap"][1]] for res in two_ranks]
    assert orders[0] == orders[1] == [(2 + 16 + 8 + 3 + 1, torch.float32), (64 + 1 + 1, torch.float32),
                                      (8 + 32 + 2 + 1, torch.float32)]
    assert all(during for _, _, during in two_ranks[0]["overlap"][1])  # rank 0: launched by hooks
    assert not any(during for _, _, during in two_ranks[1]["overlap"][1])  # rank 1 had no batch: by finish()


def test_overlapped_and_sequential_sync_agree_bit_for_bit(two_ranks):
    for res in two_ranks:
        (stepped, calls, overlapped), (seq_stepped, seq_calls, sequential) = res["overlap"], res["sequential"]
        assert stepped and seq_stepped
        assert [c[:2] for c in calls] == [c[:2] for c in seq_calls]
        assert not any(during for _, _, during in seq_calls)
        for name, grad in overlapped.items():
            assert torch.equal(grad, sequential[name]), name
            assert torch.equal(grad, two_ranks[0]["local"][name]), name  # rank 0's alone: rank 1 had no batch


def test_bf16_compression_halves_the_bytes_and_averages_within_bf16_tolerance(two_ranks):
    expected = {name: (two_ranks[0]["local"][name] + two_ranks[1]["local"][name]) / 2 for name in two_ranks[0]["local"]}
    for res in two_ranks:
        stepped, calls, grads = res["bf16"]
        assert stepped and all(dtype == torch.bfloat16 for _, dtype, _ in calls)
        for name, grad in grads.items():
            assert grad.dtype == torch.float32
            # bf16 keeps 8 significant bits: each addend and the sum are rounded once
            torch.testing.assert_close(grad, expected[name], rtol=2**-7, atol=2**-7 * expected[name].abs().max().item())
            assert not torch.equal(grad, expected[name])  # it did go through bf16
        assert torch.equal(grads["0.weight"], two_ranks[0]["bf16"][2]["0.weight"])  # ranks agree


def test_averaged_gradients_keep_the_parameter_layout(two_ranks):
    for res in two_ranks:
        param_stride, grad_stride, grad = res["layout"]
        assert grad_stride == param_stride != grad.contiguous().stride()  # channels_last, not contiguous
        assert torch.equal(grad, torch.full((3, 2, 3, 3), 9 * 1.5))  # 3x3 outputs, each reads 1 (rank 0) or 2


def test_unknown_grad_compression_is_refused():
    with pytest.raises(ValueError, match="grad compression 'fp8'"):
        GradSync(TwoGroups(), compression="fp8")


def test_gather_and_broadcast_collectives(two_ranks):
    for res in two_ranks:
        assert res["gather"] == [b"rrr", b"rrrr"]  # uneven payloads, rank order
        assert res["rng"] == 2
        weight, counter = res["broadcast"]
        assert torch.equal(weight, torch.zeros(2, 2)) and counter.item() == 0  # rank 0's, both dtypes


def test_bucket_buffers_are_reused_and_stale_gradients_refused(two_ranks):
    for r in two_ranks:
        assert r["reused"]  # the second step's averages live where the first's did: no new memory per step
        assert "zero_grad(set_to_none=True)" in r["stale"]  # the first step's averages would be overwritten


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
