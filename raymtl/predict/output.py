"""A task's output columns (Arrow) from its probabilities: labels, probabilities, top k; null on bad rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raymtl.predict.plan import Head


def output_columns(head: Head, probs: np.ndarray, bad: np.ndarray, top_k: int) -> dict[str, pa.Array]:
    """<task> and <task>_prob (and <task>_top_k) of one task; null on bad rows.

    Multiclass: the most probable label and its probability. Multilabel: the labels whose probability
    is above the task's threshold (strictly, as the validation and evaluation metrics decide), in
    label-map order, and their probabilities.
    """
    labels = np.asarray(head.labels, dtype=object)
    if head.kind == "multiclass":
        best = probs.argmax(1)
        columns = {
            head.task: pa.array(labels[best], pa.string(), mask=bad),
            f"{head.task}_prob": pa.array(probs[np.arange(len(best)), best], pa.float32(), mask=bad),
        }
    else:
        chosen = (probs > head.threshold) & ~bad[:, None]
        rows, cols = np.nonzero(chosen)
        offsets = np.concatenate([[0], np.cumsum(chosen.sum(1))])
        columns = {
            head.task: _lists(offsets, pa.array(labels[cols], pa.string()), bad),
            f"{head.task}_prob": _lists(offsets, pa.array(probs[rows, cols], pa.float32()), bad),
        }
    if top_k:
        columns[f"{head.task}_top_k"] = _top_k(labels, probs, bad, min(top_k, len(labels)))
    return columns


def _top_k(labels: np.ndarray, probs: np.ndarray, bad: np.ndarray, k: int) -> pa.Array:
    """list<struct<label: string, score: float>>, best first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probs, order, axis=1)
    pairs = pa.StructArray.from_arrays(
        [pa.array(labels[order.ravel()], pa.string()), pa.array(scores.ravel(), pa.float32())],
        names=["label", "score"],
    )
    return _lists(np.arange(0, (len(probs) + 1) * k, k), pairs, bad)


def _lists(offsets: np.ndarray, values: pa.Array, bad: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pa.array(bad))
