"""A prediction run's plan, made once on the driver: the inputs to decode, the heads to apply, the columns.

Small and picklable: the Ray Data stages (`raymtl.predict.actors`) get it as their constructor
argument. Faults (an unknown task, a column the model does not know) are named before Ray runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raymtl import storage
from raymtl.config import PREDICTION_COLUMNS, DataSpec, TaskSpec
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import Preprocessor
from raymtl.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from raymtl.models.artifact import SavedModel

ID, ERROR = PREDICTION_COLUMNS  # the output's id and error columns
LABEL = "label"  # evaluation's label key


@dataclass(frozen=True)
class Input:
    """One model input read from the items: an image column (every view of it) or a text column."""

    kind: str  # image | text
    column: str | None  # None: an image task whose views all name their own columns
    tasks: tuple[str, ...]  # the tasks that read it (they share its decoding and its errors)

    def preprocessor(self, data: DataSpec) -> Preprocessor:
        """The training transform restricted to this input, named after the tasks that read it."""
        image, text = self.kind == "image", self.kind == "text"
        name = ",".join(self.tasks)
        spec = TaskSpec(name, train=None, image_column=self.column if image else None,
                        text_column=self.column if text else None)
        info = TaskInfo(name, "multiclass", [], 0, 0, has_image=image, has_text=text)  # labels unused
        return Preprocessor(spec, info, data, with_labels=False, on_bad="mark", retried=False)  # no checkpoint


@dataclass(frozen=True)
class Head:
    """What turns one task's probabilities into its output columns."""

    task: str
    kind: str
    labels: tuple[str, ...]
    threshold: float
    inputs: tuple[int, ...]  # indices into the plan's inputs


@dataclass(frozen=True)
class Plan:
    """Everything the two stages need, built once on the driver (small and picklable)."""

    model_path: str  # absolute local path or URI
    data: DataSpec
    inputs: tuple[Input, ...]
    heads: tuple[Head, ...]
    id_column: str
    strict: bool
    top_k: int
    label_column: str | None = None  # evaluation: also encode this column as the (single) head's labels
    masked: str | None = None  # evaluation: a modality (image | text) the model runs without (`MultiTaskModel.mask`)
    empty_text_is_bad: bool = True  # prediction flags the row; evaluation scores it as training's validation does

    def preprocessors(self, data: DataSpec) -> list[Preprocessor]:
        """One per input; `data` is the plan's with the tokenizer folder of the node it runs on."""
        return [inp.preprocessor(data) for inp in self.inputs]

    @property
    def required_columns(self) -> dict[str, str]:
        """Column -> what names it, for every column the run reads (the id first)."""
        columns = {self.id_column: "id_column"}
        if self.label_column:
            columns[self.label_column] = "label_column"
        for inp, prep in zip(self.inputs, self.preprocessors(self.data)):
            columns.update({c: f"{inp.kind}_column" for c in prep.input_columns if c not in columns})
        return columns


def make_plan(
    model_path: str,
    saved: SavedModel,
    *,
    tasks: list[str] | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    strict: bool = False,
    top_k: int = 0,
    label_column: str | None = None,
) -> Plan:
    """The plan of a run of the model `saved` (loaded from `model_path`); faults named before Ray runs."""
    specs = task_specs(saved.experiment, saved.infos, tasks, image_column=image_column, text_column=text_column)
    inputs = plan_inputs(specs, saved.infos)
    return Plan(
        model_path=storage.normalize(model_path),
        data=saved.data,
        inputs=tuple(inputs),
        heads=tuple(_head(saved.infos[name], inputs) for name in specs),
        id_column=_id_column(specs, id_column),
        strict=strict,
        top_k=top_k,
        label_column=label_column,
    )


def task_specs(
    experiment: dict[str, Any],
    infos: dict[str, TaskInfo],
    tasks: list[str] | None = None,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
) -> dict[str, TaskSpec]:
    """Column names of each task to predict: the ones it was trained with, unless overridden.

    A task the stored experiment does not list (kept from a base model) reads the columns its
    other tasks read.
    """
    trained = {t["name"]: t for t in experiment.get("tasks", [])}
    shared = {key: next((t[key] for t in trained.values() if t.get(key)), None)
              for key in ("image_column", "text_column", "id_column")}
    specs = {}
    for name in tasks or list(infos):
        if name not in infos:
            raise ConfigError(f"unknown task {name!r}{did_you_mean(name, infos)}; the model's tasks are {list(infos)}")
        info, own = infos[name], {k: v for k, v in trained.get(name, {}).items() if v is not None}
        column = {**shared, **own, **{k: v for k, v in (("image_column", image_column),
                                                           ("text_column", text_column)) if v}}
        spec = TaskSpec(name, train=None, kind=info.kind, id_column=column["id_column"],
                        image_column=column["image_column"] if info.has_image else None,
                        text_column=column["text_column"] if info.has_text else None)
        if info.has_text and spec.text_column is None:
            raise ConfigError(f"task {name!r} reads text but the model records no text column; pass text_column")
        specs[name] = spec
    return specs


def plan_inputs(specs: dict[str, TaskSpec], infos: dict[str, TaskInfo]) -> list[Input]:
    """The distinct inputs of the tasks: each image column decoded, each text column tokenized once."""
    readers: dict[tuple[str, str | None], list[str]] = {}
    for name, spec in specs.items():
        if infos[name].has_image:
            readers.setdefault(("image", spec.image_column), []).append(name)
        if infos[name].has_text:
            readers.setdefault(("text", spec.text_column), []).append(name)
    return [Input(kind, column, tuple(tasks)) for (kind, column), tasks in readers.items()]


def _head(info: TaskInfo, inputs: list[Input]) -> Head:
    used = tuple(i for i, inp in enumerate(inputs) if info.name in inp.tasks)
    return Head(info.name, info.kind, tuple(info.labels), info.threshold, used)


def _id_column(specs: dict[str, TaskSpec], id_column: str | None) -> str:
    """The item id: `id_column`, else the trained tasks' id column, else the image path."""
    candidates = [id_column, *(s.id_column for s in specs.values()), *(s.image_column for s in specs.values())]
    found = next((c for c in candidates if c), None)
    if found is None:
        raise ConfigError("the items have no id column the model knows of; pass id_column")
    return found
