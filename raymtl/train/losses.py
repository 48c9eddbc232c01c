"""Per-task loss functions, and the loss validation and `raymtl evaluate` report.

The training criterion (`task_loss`) drives the gradient; the reported loss (`likelihood_loss`, or
`likelihood_loss_sum` of probabilities) is the negative log-likelihood, whatever the criterion, so
val/<task>/loss of a task with label smoothing or a loss of its own compares with any other's and
with `raymtl evaluate`'s. They are unweighted: the training loop multiplies by the task weight, so
weighting lives in one place. Built-in losses compute in float32, since bf16 logits under autocast
lose precision in the log-sum-exp and a bf16 logit cannot be paired with a float32 multi-hot target
outside autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Callable

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from raymtl.config import TaskSpec
from raymtl.data.task_info import TaskInfo

LossFn = Callable[[Tensor, Tensor], Tensor]


def training_loss(
    outputs: Sequence[tuple[Tensor, float]], label: Tensor, loss: LossFn, weight: float
) -> tuple[Tensor, Tensor]:
    """(the loss a training step backpropagates, the fused head's unweighted loss) from a model's
    `training_outputs`: each head's loss at its weight, summed, times the task's `weight`. The
    training step and the affinity's lookahead step (`raymtl.train.affinity`) both take it, so the
    lookahead is the step training takes."""
    head_losses = [loss(logits.float(), label) for logits, _ in outputs]
    return sum(h * w for h, (_, w) in zip(head_losses, outputs)) * weight, head_losses[0]


def task_loss(task: TaskSpec, info: TaskInfo) -> LossFn:
    """`loss(logits, target) -> scalar` for one task: the user's `task.loss` if set, else
    cross-entropy (with `task.label_smoothing`) for multiclass or BCE-with-logits for multilabel."""
    if task.loss is not None:
        return task.loss
    if info.kind == "multiclass":
        return partial(_cross_entropy, label_smoothing=task.label_smoothing)
    if info.kind == "multilabel":
        if task.label_smoothing:
            raise ValueError(f"task {task.name!r}: label_smoothing applies to multiclass tasks only")
        return _binary_cross_entropy
    raise ValueError(f"task {task.name!r}: unknown task kind {info.kind!r}")


def likelihood_loss(kind: str) -> LossFn:
    """`loss(logits, target) -> scalar`: the mean negative log-likelihood, without label smoothing
    (cross-entropy, or BCE-with-logits averaged over the labels)."""
    return _cross_entropy if kind == "multiclass" else _binary_cross_entropy


def likelihood_loss_sum(probs: np.ndarray, target: np.ndarray, kind: str) -> float:
    """The summed negative log-likelihood of rows' probabilities: `likelihood_loss` of their logits
    times the rows, in float64 from the probabilities themselves (an ensemble's average has no logits).

    A value the dtype cannot tell from 0 stands for one below what it can, so the row costs the least it
    can, not infinity: p is floored at the dtype's smallest positive value (103.3 in float32), and a
    multilabel 1 - p at half the step below 1 (p rounded to 1: 17.3 in float32).
    """
    p, dtype = probs.astype(np.float64), np.finfo(probs.dtype)
    if kind == "multiclass":
        return float(-np.log(np.maximum(p[np.arange(len(p)), target], dtype.smallest_subnormal)).sum())
    t = target.astype(np.float64)
    per_label = (t * np.log(np.maximum(p, dtype.smallest_subnormal))
                 + (1 - t) * np.log(np.maximum(1 - p, dtype.epsneg / 2)))
    return float(-per_label.mean(1).sum())


def _cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def _binary_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
