"""Optimizers and learning-rate schedules built from `TrainingSpec`.

A per-batch schedule is a function of the global samples trained on (all ranks together), not of
a rank's step count: a run whose world size changes mid-stage keeps the same learning rate at the
same point of its data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raymtl import console
from raymtl.config import DEFAULT_LR_MULTIPLIERS, TrainingSpec


def build_optimizer(model, training: TrainingSpec, lr: float, saved: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer of `model`'s trainable parameters at `lr`.

    With multipliers in force (`lr_multipliers`), one parameter group per model part
    (`MultiTaskModel.parts()`) with trainable parameters, at lr x its multiplier (default 1), tagged
    with its "part"; parts at the base lr come first, so `param_groups[0]["lr"]` (the lr a run logs)
    is the base lr whenever a part trains at it. Without, one group in `model.parameters()` order: the
    layout of checkpoints written before multipliers existed, which a resumed run must load. Either
    way the groups are a function of the config and the frozen parts alone, so a resumed stage
    rebuilds the same groups and `load_state_dict` restores their lrs. `saved`, the state_dict a
    resumed run will load: one written before the default multipliers (one group without a "part",
    where the default makes one per part) resumes at one lr, as it was trained, unless the config sets `lr_multipliers`.
    AdamW is fused on a GPU.
    """
    multipliers = lr_multipliers(model, training)
    if multipliers and saved is not None and training.lr_multipliers is None and "part" not in saved["param_groups"][0]:
        console.say("[raymtl] this checkpoint trained every part at one lr (from before the default "
                    f"lr_multipliers {DEFAULT_LR_MULTIPLIERS}): resuming it so; set training.lr_multipliers to change")
        multipliers = {}
    if multipliers:
        parts = model.parts()
        order = sorted(parts, key=lambda part: multipliers.get(part, 1.0) != 1.0)  # stable: parts' order otherwise
        groups = [{"params": params, "lr": lr * multipliers.get(part, 1.0), "part": part}
                  for part in order if (params := [p for p in parts[part] if p.requires_grad])]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=training.momentum, weight_decay=training.weight_decay)
    fused = bool(groups) and all(p.is_cuda for g in groups for p in g["params"])  # one kernel for the whole update
    return torch.optim.AdamW(groups, lr=lr, weight_decay=training.weight_decay, fused=fused or None)


def lr_multipliers(model, training: TrainingSpec) -> dict[str, float]:
    """The multipliers in force ({} = one lr): the config's, or by default (None) `DEFAULT_LR_MULTIPLIERS`
    where one of their parts trains in `model` (an image-only model, or a stage with the text encoder
    frozen, keeps the one-group layout)."""
    if training.lr_multipliers is not None:
        chosen = training.lr_multipliers
    elif hasattr(model, "parts") and any(p.requires_grad for part in DEFAULT_LR_MULTIPLIERS
                                         for p in model.parts().get(part, [])):
        chosen = DEFAULT_LR_MULTIPLIERS
    else:
        return {}
    return chosen if any(factor != 1.0 for factor in chosen.values()) else {}


@dataclass
class LrSchedule:
    """A torch LR scheduler and when to step it: after every batch, or once per epoch."""

    scheduler: object | None
    per_step: bool

    def after_step(self, samples: int) -> None:
        """After an optimizer step that trained on `samples` global samples."""
        if self.scheduler is not None and self.per_step:
            self.scheduler.last_epoch += samples - 1  # LambdaLR's "epoch" counts samples; step() adds the last one
            self.scheduler.step()

    def after_epoch(self, val_loss: float | None) -> None:
        if self.scheduler is None or self.per_step:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if val_loss is not None:
                self.scheduler.step(val_loss)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> str | None:
        """Continue a saved schedule where it was; returns how its length changed, in words (None: it did not).

        A per-batch factor (`WarmupCosine`) stays the one built from the current config, on the step
        size its stage started on (`stage_step`), not the saved one: a run rerun with more epochs goes
        on along the longer cosine (the saved one has reached zero), from the lr it gives at the
        saved sample count. With the config unchanged the two factors are equal and nothing moves.
        """
        if self.scheduler is None or not state:
            return None
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.load_state_dict(state)
            return None
        saved = state["lr_lambdas"]
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(saved)})
        now = vars(self.scheduler.lr_lambdas[0])
        if saved[0] is None or saved[0] == now:
            return None
        self.scheduler.last_epoch -= 1
        self.scheduler.step()  # the optimizer's lrs: the current factor's at the saved sample count
        return (f"the LR schedule changed with the config (warmup {saved[0]['warmup']} -> {now['warmup']}, "
                f"total {saved[0]['total']} -> {now['total']} global samples): it goes on along the new one "
                f"from sample {self.scheduler.last_epoch}")


def stage_step(state: dict) -> int | None:
    """The step size (global samples) that a saved per-batch schedule's stage started on; None for others."""
    factors = state.get("lr_lambdas") or [None]
    return factors[0]["step"] if factors[0] else None


@dataclass
class WarmupCosine:
    """The LR factor after `samples` global samples: linear warmup over `warmup` samples, then a
    cosine to zero at `total`. `step` is one step's samples when the stage started (the warmup's
    first factor is step / warmup). An object, not a closure: LambdaLR's state_dict saves its
    fields, so a resume knows the step size its stage started on (`stage_step`) and whether the
    config changed its length (`LrSchedule.load_state_dict`)."""

    warmup: int
    total: int
    step: int

    def __call__(self, samples: int) -> float:
        if samples < self.warmup:
            return (samples + self.step) / self.warmup
        progress = (samples - self.warmup) / max(self.step, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, training: TrainingSpec, total_steps: int, step_samples: int = 1
) -> LrSchedule:
    """`warmup_cosine` steps per batch over `total_steps` steps of `step_samples` global samples
    each (counted in samples, see `WarmupCosine`); `step` and `plateau` step per epoch."""
    kind = training.lr_schedule
    if kind == "warmup_cosine":
        factor = WarmupCosine(max(0, training.warmup_steps) * step_samples, total_steps * step_samples, step_samples)
        return LrSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factor), per_step=True)
    if kind == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=training.step_size, gamma=training.gamma)
        return LrSchedule(sched, per_step=False)
    if kind == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=training.gamma, patience=training.plateau_patience
        )
        return LrSchedule(sched, per_step=False)
    return LrSchedule(None, per_step=False)
