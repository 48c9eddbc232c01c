"""Per-task source tables: read, check and describe them before Ray starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TaskInfo:
    """What the rest of the system needs to know about one task's data (JSON-serialisable)."""

    name: str
    kind: str  # multiclass | multilabel
    labels: list[str]  # label names; index = class id
    n_train: int
    n_val: int
    has_image: bool
    has_text: bool
    weight: float = 1.0

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return asdict(self)
