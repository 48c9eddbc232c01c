"""Per-task losses: torch's CE (with smoothing), BCE, and the user's callable."""

import pytest
import torch
import torch.nn.functional as F

from raymtl.config import TaskSpec
from raymtl.data.task_info import TaskInfo
from raymtl.train.losses import task_loss


def info(kind, n=3):
    return TaskInfo("t", kind, [str(i) for i in range(n)], 4, 2, True, False, weight=3.0)


def test_cross_entropy_with_label_smoothing_matches_torch():
    logits, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    loss = task_loss(TaskSpec("t", "x.csv", label_smoothing=0.2), info("multiclass"))
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target, label_smoothing=0.2))
    plain = task_loss(TaskSpec("t", "x.csv"), info("multiclass"))
    assert torch.allclose(plain(logits, target), F.cross_entropy(logits, target))


def test_cross_entropy_is_float32_for_bf16_logits_and_unweighted():
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss = task_loss(TaskSpec("t", "x.csv", weight=3.0), info("multiclass"))(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(logits.bfloat16().float(), target))  # weight not applied


def test_binary_cross_entropy_for_multilabel():
    logits, target = torch.randn(4, 3), torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]).float()
    loss = task_loss(TaskSpec("t", "x.csv", kind="multilabel"), info("multilabel"))
    assert torch.allclose(loss(logits, target), F.binary_cross_entropy_with_logits(logits, target))
    assert loss(logits.bfloat16(), target).dtype == torch.float32


def test_label_smoothing_rejected_for_multilabel():
    with pytest.raises(ValueError, match="multiclass tasks only"):
        task_loss(TaskSpec("t", "x.csv", kind="multilabel", label_smoothing=0.1), info("multilabel"))


def test_custom_callable_is_used():
    calls = []

    def custom(logits, target):
        calls.append((logits, target))
        return logits.sum() * 0 + 7.0

    loss = task_loss(TaskSpec("t", "x.csv", loss=custom), info("multiclass"))
    assert loss is custom
    assert loss(torch.zeros(2, 3), torch.tensor([0, 1])).item() == 7.0
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_the_reported_loss_is_the_nll_of_the_logits_or_of_their_probabilities(kind):
    """likelihood_loss ignores the training criterion's smoothing; likelihood_loss_sum of the
    probabilities is it times the rows, with no clamp on confident mistakes (logits up to +-20)."""
    from raymtl.models.ensemble import probabilities
    from raymtl.train.losses import likelihood_loss, likelihood_loss_sum

    torch.manual_seed(0)
    logits = torch.randn(6, 3) * 8 - (12 if kind == "multilabel" else 0)  # multilabel: p near 0, where float32 is exact
    target = torch.tensor([0, 2, 1, 1, 0, 2]) if kind == "multiclass" else (torch.rand(6, 3) < 0.5).float()
    nll = likelihood_loss(kind)(logits, target)
    assert torch.allclose(nll, F.cross_entropy(logits, target) if kind == "multiclass"
                          else F.binary_cross_entropy_with_logits(logits, target))
    got = likelihood_loss_sum(probabilities(logits, kind).numpy(), target.numpy(), kind)
    assert got == pytest.approx(6 * nll.item(), rel=1e-5)
