"""Validation inside the loop: every task's metrics over all ranks' shards, with rank 0's BatchNorm statistics.

A task's loss here is the negative log-likelihood (`likelihood_loss`), not its training criterion
(label smoothing, a loss of its own): what `raymtl evaluate` reports for the same model and rows.
"""

from __future__ import annotations

import contextlib

import torch

from raymtl.config import Experiment
from raymtl.data.task_info import TaskInfo
from raymtl.models.ensemble import probabilities
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.batches import TaskBatches
from raymtl.train.collectives import all_reduce_sum, broadcast_tensors
from raymtl.train.losses import likelihood_loss
from raymtl.train.metrics import make_accumulator
from raymtl.train.precision import Precision


@torch.no_grad()
def evaluate(model: MultiTaskModel, exp: Experiment, infos: dict[str, TaskInfo], data: TaskBatches, device,
             precision: Precision | None = None) -> dict:
    """Per-task validation metrics over all ranks' shards (metric states summed, then computed), under
    the training's autocast (`precision`; None: fp32)."""
    sync_buffers(model)
    model.eval()
    accs = {name: make_accumulator(info, exp.task(name).threshold, device) for name, info in infos.items() if info.n_val}
    losses = {name: likelihood_loss(infos[name].kind) for name in accs}
    for name, batch in data:
        if batch is not None:
            with precision.autocast() if precision is not None else contextlib.nullcontext():
                logits = model(batch, name).float()
            nll_sum = losses[name](logits, batch["label"]) * len(logits)
            accs[name].update(probabilities(logits, infos[name].kind), batch["label"], nll_sum)
    results = {}
    for name, acc in sorted(accs.items()):  # the same order on every rank: one all-reduce per task
        acc.load_state(all_reduce_sum(acc.state))
        results[name] = acc.compute()
    model.train()
    return results


def sync_buffers(model: MultiTaskModel) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics), as DDP's broadcast_buffers does."""
    broadcast_tensors(list(model.buffers()))
