"""Per-task metrics that stay exact under DDP, a smoothed training loss, and the epoch table.

An accumulator keeps sufficient statistics (counts and a loss sum), never averages, in one flat
float64 tensor: the loop sums every rank's tensor with a single `all_reduce(SUM)`, loads it back
and computes, which gives exactly the metrics of one accumulator that saw all ranks' data.

Conventions:
- Metrics are computed from probabilities (softmax or sigmoid, `raymtl.models.ensemble.probabilities`),
  as prediction sees them, so validation, `raymtl evaluate` and `raymtl predict` decide alike.
- The loss is the caller's: the summed negative log-likelihood of each batch (`raymtl.train.losses`).
- Macro-F1 averages per-class F1 over the classes that appear in the targets or the predictions:
  a class with neither carries no information and is left out; with no class seen at all
  (multilabel only) it is 0.0. Multiclass: sklearn's `f1_score(average="macro")`, whose classes
  are those seen. Multilabel: not sklearn's default, which scores every label, such a label 0.0
  (`zero_division`), pulling the mean down; sklearn's with `zero_division=np.nan` when a label is seen.
- Micro-F1 with no positives in targets and predictions is 0.0 (zero_division=0).
- A multilabel probability counts as positive when it is > threshold (strictly, as torchmetrics and
  prediction do).
- An accumulator that saw no example computes NaN for every key.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from raymtl.config import TASK_METRICS
from raymtl.data.task_info import TaskInfo


class Accumulator(ABC):
    """Running statistics of one task: `[task statistics..., loss_sum, count]` in float64.

    float64 keeps counts exact up to 2**53; NCCL and gloo both reduce it.
    """

    keys: tuple[str, ...]  # what compute() returns

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        self._state = torch.zeros(size + 2, dtype=torch.float64, device=device)

    @property
    def state(self) -> Tensor:
        """The live state tensor: `all_reduce` it in place, or reduce a copy and `load_state` it."""
        return self._state

    def load_state(self, state: Tensor) -> None:
        if state.shape != self._state.shape:
            raise ValueError(f"accumulator state has shape {tuple(self._state.shape)}, got {tuple(state.shape)}")
        self._state = state.detach().to(self._state.device, torch.float64).clone()

    @torch.no_grad()
    def update(self, probs: Tensor, target: Tensor, loss_sum: float | Tensor) -> None:
        """Add a batch: probabilities [B, C], its targets, and the SUM (not mean) of its per-example loss.

        A tensor `loss_sum` is added on device, without a host sync.
        """
        self._state[:-2] += self._stats(probs.detach(), target).to(self._state)
        self._state[-2] += torch.as_tensor(loss_sum).detach().to(self._state)
        self._state[-1] += target.shape[0]

    def compute(self) -> dict[str, float]:
        count = self._state[-1].item()
        if count == 0:
            return {key: math.nan for key in self.keys}
        return {"loss": self._state[-2].item() / count, **self._metrics(self._state[:-2], count)}

    @abstractmethod
    def _stats(self, probs: Tensor, target: Tensor) -> Tensor:
        """A batch's task statistics, laid out like `state[:-2]`."""

    @abstractmethod
    def _metrics(self, stats: Tensor, count: float) -> dict[str, float]:
        """Metrics (besides loss) from summed task statistics over `count` examples."""


class MulticlassAccumulator(Accumulator):
    """Confusion matrix (rows: true class, columns: predicted class) -> accuracy, macro-F1."""

    keys = TASK_METRICS["multiclass"]

    def __init__(self, num_labels: int, device: torch.device | str | None = None) -> None:
        super().__init__(num_labels * num_labels, device)
        self.num_labels = num_labels

    def _stats(self, probs: Tensor, target: Tensor) -> Tensor:
        c = self.num_labels
        cells = target.long() * c + probs.argmax(1)
        # Not bincount: on a GPU it reads the cells' min and max back to size its output, a sync per batch.
        return torch.zeros(c * c, dtype=torch.long, device=cells.device).index_add_(0, cells, torch.ones_like(cells))

    def _metrics(self, stats: Tensor, count: float) -> dict[str, float]:
        confusion = stats.view(self.num_labels, self.num_labels)
        tp = confusion.diag()
        return {
            "accuracy": tp.sum().item() / count,
            "macro_f1": _macro_f1(tp, confusion.sum(0) - tp, confusion.sum(1) - tp),
        }


class MultilabelAccumulator(Accumulator):
    """Per-label tp/fp/fn and exact-match count -> micro-F1, macro-F1, exact_match."""

    keys = TASK_METRICS["multilabel"]

    def __init__(self, num_labels: int, threshold: float = 0.5, device: torch.device | str | None = None) -> None:
        super().__init__(3 * num_labels + 1, device)
        self.num_labels = num_labels
        self.threshold = threshold

    def _stats(self, probs: Tensor, target: Tensor) -> Tensor:
        pred = probs > self.threshold
        true = target > 0.5
        tp, fp, fn = (pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)
        exact = (pred == true).all(1).sum()
        return torch.cat([tp, fp, fn, exact[None]])

    def _metrics(self, stats: Tensor, count: float) -> dict[str, float]:
        tp, fp, fn = stats[:-1].view(3, self.num_labels)
        micro_denominator = (2 * tp + fp + fn).sum().item()
        return {
            "micro_f1": 2 * tp.sum().item() / micro_denominator if micro_denominator else 0.0,
            "macro_f1": _macro_f1(tp, fp, fn),
            "exact_match": stats[-1].item() / count,
        }


def _macro_f1(tp: Tensor, fp: Tensor, fn: Tensor) -> float:
    """Mean F1 over the classes with any true or predicted example (see module conventions)."""
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    if not present.any():
        return 0.0
    return (2 * tp[present] / denominator[present]).mean().item()


def make_accumulator(
    info: TaskInfo, threshold: float = 0.5, device: torch.device | str | None = None
) -> Accumulator:
    """The accumulator for a task's kind; `threshold` is the multilabel decision threshold."""
    if info.kind == "multiclass":
        return MulticlassAccumulator(info.num_labels, device)
    if info.kind == "multilabel":
        return MultilabelAccumulator(info.num_labels, threshold, device)
    raise ValueError(f"task {info.name!r}: unknown task kind {info.kind!r}")


class Ewma:
    """Exponentially weighted mean of a noisy stream (a task's training loss), bias-corrected.

    As for Adam's moments, the mean starts at 0 and is divided by 1 - (1 - alpha)**n: the result is
    an exact weighted average of the n values seen, not dragged towards 0 in the first steps.
    """

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"EWMA alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._mean: float | Tensor = 0.0
        self._steps = 0

    def update(self, value: float | Tensor) -> None:
        """Add one value. A tensor stays on its device (float64): no host sync until `value` is read."""
        if isinstance(value, Tensor):
            value = value.detach().to(torch.float64)
        self._mean = self.alpha * value + (1.0 - self.alpha) * self._mean
        self._steps += 1

    @property
    def value(self) -> float | None:
        """The smoothed value; None before the first update (a task not trained yet)."""
        if not self._steps:
            return None
        return float(self._mean) / (1.0 - (1.0 - self.alpha) ** self._steps)

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": float(self._mean), "steps": self._steps}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self._mean = float(state["mean"])
        self._steps = int(state["steps"])


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Right-aligned text table: one row per epoch, one column per key in first-seen order.

    Rows are flat metric dicts (e.g. `{"epoch": 1, "val/color/accuracy": 0.9, "val/mean_loss": 0.4}`);
    floats print with 4 decimals, a key missing from a row as "-".
    """
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
