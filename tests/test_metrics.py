"""Metric accumulators, EWMA and the epoch table, against values computed by hand."""

import math

import pytest
import torch

from raymtl.data.task_info import TaskInfo
from raymtl.train.metrics import Ewma, make_accumulator, summary_table


def info(kind, n):
    return TaskInfo("t", kind, [str(i) for i in range(n)], 10, 10, True, False)


def one_hot_probs(pred, n):
    return torch.softmax(torch.nn.functional.one_hot(torch.tensor(pred), n).float() * 4 - 2, 1)


# Multiclass, 3 classes. true: 0 0 1 1 2 ; pred: 0 1 1 1 0
#   class 0: tp=1 fp=1 fn=1 -> F1 = 2/4 = 0.5
#   class 1: tp=2 fp=1 fn=0 -> F1 = 4/5 = 0.8
#   class 2: tp=0 fp=0 fn=1 -> F1 = 0
#   accuracy 3/5 = 0.6, macro-F1 = (0.5 + 0.8 + 0) / 3 = 0.4333...
MC_TRUE, MC_PRED = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]


def test_multiclass_by_hand():
    acc = make_accumulator(info("multiclass", 3))
    acc.update(one_hot_probs(MC_PRED, 3), torch.tensor(MC_TRUE), loss_sum=2.5)
    out = acc.compute()
    assert out.keys() == {"loss", "accuracy", "macro_f1"}
    assert out["loss"] == pytest.approx(0.5)
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_multiclass_macro_f1_skips_absent_classes():
    # 4 classes; class 3 is never true nor predicted: averaged over classes 0..2 only.
    acc = make_accumulator(info("multiclass", 4))
    acc.update(one_hot_probs(MC_PRED, 4), torch.tensor(MC_TRUE), loss_sum=torch.tensor(1.0))
    assert acc.compute()["macro_f1"] == pytest.approx((0.5 + 0.8) / 3)


# Multilabel, 3 labels, threshold 0.5 on the probabilities.
#   true            pred
#   1 0 1           1 0 0      -> not exact
#   0 1 0           0 1 0      -> exact
#   1 1 0           1 0 1      -> not exact
#   0 0 0           0 0 0      -> exact
#   label 0: tp=2 fp=0 fn=0 -> F1 1 ; label 1: tp=1 fp=0 fn=1 -> F1 2/3 ; label 2: tp=0 fp=1 fn=1 -> 0
#   micro: tp=3 fp=1 fn=2 -> 6/9 ; macro: (1 + 2/3 + 0) / 3 = 5/9 ; exact match 2/4
ML_TRUE = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]
ML_PRED = [[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]]


def ml_probs(pred):
    return torch.sigmoid(torch.tensor(pred).float() * 4 - 2)


def test_multilabel_by_hand():
    acc = make_accumulator(info("multilabel", 3), threshold=0.5)
    acc.update(ml_probs(ML_PRED), torch.tensor(ML_TRUE).float(), loss_sum=2.0)
    out = acc.compute()
    assert out.keys() == {"loss", "micro_f1", "macro_f1", "exact_match"}
    assert out["loss"] == pytest.approx(0.5)
    assert out["micro_f1"] == pytest.approx(6 / 9)
    assert out["macro_f1"] == pytest.approx(5 / 9)
    assert out["exact_match"] == pytest.approx(0.5)


def test_multilabel_threshold():
    # 0.731: positive at threshold 0.5, negative at 0.8 -> nothing predicted at all.
    acc = make_accumulator(info("multilabel", 2), threshold=0.8)
    acc.update(torch.full((2, 2), 0.731), torch.tensor([[1.0, 0.0], [0.0, 0.0]]), loss_sum=0.0)
    out = acc.compute()
    # label 0: tp=0 fp=0 fn=1 -> F1 0 ; label 1 absent -> macro 0 ; micro 0/1 = 0 ; row 2 exact.
    assert (out["micro_f1"], out["macro_f1"], out["exact_match"]) == (0.0, 0.0, 0.5)


@pytest.mark.parametrize(
    "kind, n, probs, target",
    [
        ("multiclass", 3, one_hot_probs(MC_PRED, 3), torch.tensor(MC_TRUE)),
        ("multilabel", 3, ml_probs(ML_PRED), torch.tensor(ML_TRUE).float()),
    ],
)
def test_summed_state_of_two_ranks_equals_one_accumulator(kind, n, probs, target):
    single = make_accumulator(info(kind, n))
    single.update(probs, target, loss_sum=3.0)
    ranks = [make_accumulator(info(kind, n)) for _ in range(2)]
    ranks[0].update(probs[:2], target[:2], loss_sum=1.0)
    ranks[1].update(probs[2:], target[2:], loss_sum=2.0)
    reduced = make_accumulator(info(kind, n))
    reduced.load_state(ranks[0].state + ranks[1].state)  # what all_reduce(SUM) computes
    assert reduced.compute() == single.compute()
    assert torch.equal(reduced.state, single.state)


def test_empty_accumulator_is_nan_and_bad_state_is_rejected():
    acc = make_accumulator(info("multiclass", 3))
    assert all(math.isnan(v) for v in acc.compute().values())
    with pytest.raises(ValueError, match="shape"):
        acc.load_state(torch.zeros(3))


def test_ewma_by_hand_and_resume():
    ewma = Ewma(0.5)
    assert ewma.value is None
    ewma.update(4.0)
    assert ewma.value == pytest.approx(4.0)  # m=2, /(1-0.5)
    ewma.update(torch.tensor(2.0))  # a tensor is accumulated as a tensor, read as a float
    assert isinstance(ewma._mean, torch.Tensor)
    assert ewma.value == pytest.approx(8 / 3)  # m=2, /(1-0.25): (0.5*2 + 0.25*4) / 0.75
    resumed = Ewma(0.5)
    resumed.load_state_dict(ewma.state_dict())
    # m = 0.5*1 + 0.5*2 = 1.5, / (1 - 0.125) = 12/7
    resumed.update(torch.tensor(1.0))
    ewma.update(1.0)
    assert resumed.value == pytest.approx(12 / 7) == ewma.value
    with pytest.raises(ValueError):
        Ewma(0.0)


def test_summary_table_aligned():
    rows = [
        {"epoch": 1, "val/color/loss": 1.23456, "val/mean_loss": 1.5},
        {"epoch": 2, "val/color/loss": 0.5, "val/tags/loss": 0.25, "val/mean_loss": 0.375},
    ]
    assert summary_table(rows) == "\n".join(
        [
            "epoch  val/color/loss  val/mean_loss  val/tags/loss",
            "-----  --------------  -------------  -------------",
            "    1          1.2346         1.5000              -",
            "    2          0.5000         0.3750         0.2500",
        ]
    )
    assert summary_table([]) == ""
