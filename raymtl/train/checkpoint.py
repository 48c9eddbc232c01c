"""Training checkpoints: a saved-model artifact plus everything needed to resume exactly.

A checkpoint folder is a complete `raymtl.load`-able model (see `raymtl.models.artifact`) with one
extra file, `train_state.pt`: optimizer, LR schedule, position in the task schedule, EWMA losses
and every rank's RNG states, so a resumed run continues the identical sequence of tasks.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

TRAIN_STATE_FILE = "train_state.pt"


@dataclass
class Position:
    """Where training is: `step` batches of epoch `epoch` are done (global_step counts all)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_train_state(
    folder: Path,
    *,
    position: Position,
    stage: int,
    optimizer: torch.optim.Optimizer,
    lr_schedule_state: dict,
    ewma: dict[str, dict],
    affinity: dict | None,
    rng_states: list[dict],
) -> None:
    torch.save(
        {
            "position": asdict(position),
            "stage": stage,
            "optimizer": optimizer.state_dict(),
            "lr_schedule": lr_schedule_state,
            "ewma": ewma,
            "affinity": affinity,
            "rng": rng_states,
        },
        Path(folder) / TRAIN_STATE_FILE,
    )


def load_train_state(folder: Path) -> dict:
    state = torch.load(Path(folder) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    state["position"] = Position(**state["position"])
    return state
