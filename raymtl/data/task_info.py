"""`TaskInfo`: what the model, the loss, the metrics and the data pipeline know of one task's data.

Built by `raymtl.data.inspection.inspect_tasks` from the tables, saved with every model.
"""

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
    threshold: float = 0.5  # multilabel decision threshold, kept with the model for prediction
    n_test: int = 0  # rows of the test split (0: none), for evaluation; not saved with a model (`to_dict`)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        """What a saved model keeps: no test split's size, which raymtl versions before it cannot read."""
        return {key: value for key, value in asdict(self).items() if key != "n_test"}
