"""The two Ray Data stages of a prediction run: `Prepare` (decoding, CPU actors), `Predict` (the model)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raymtl import storage
from raymtl.config import DataSpec, TaskSpec
from raymtl.data.task_info import TaskInfo
from raymtl.data.transforms import Preprocessor, load_tokenizer
from raymtl.errors import ConfigError
from raymtl.predict.output import output_columns
from raymtl.predict.plan import ERROR, ID, LABEL, Head, Input, Plan


class BadRowError(ConfigError):
    """A bad input row in a strict run; the message names the row's id and what is wrong."""


class Prepare:
    """Raw item rows -> every input's model arrays (keys "<input index>/<key>"), ids and errors.

    A CPU actor: it fetches the model's tokenizer once when that is not on its node (the driver
    alone downloads a URI model).
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.preprocessors = plan.preprocessors(_local_tokenizer(plan.data, plan.model_path))
        self.labels = _label_encoder(plan) if plan.label_column else None

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        plan = self.plan
        batch = batch.reset_index(drop=True)
        ids = batch[plan.id_column]  # an empty id stays null in the output (pandas keeps NaN as str)
        out: dict[str, np.ndarray] = {ID: np.array([None if pd.isna(v) else str(v) for v in ids], dtype=object)}
        for i, (inp, prep) in enumerate(zip(plan.inputs, self.preprocessors)):
            arrays = prep(batch)
            if inp.kind == "text" and plan.empty_text_is_bad:
                arrays[ERROR] = _empty_texts(batch[inp.column], inp)
            out.update({f"{i}/{key}": value for key, value in arrays.items() if key != "task"})
        if self.labels is not None:
            out[LABEL] = self.labels(batch)[LABEL]
        out[ERROR] = _join_errors([out[f"{i}/{ERROR}"] for i in range(len(plan.inputs))])
        bad = np.flatnonzero(out[ERROR] != "")
        if plan.strict and len(bad):
            raise BadRowError(f"bad row {plan.id_column}={out[ID][bad[0]]!r}: {out[ERROR][bad[0]]}")
        return out


def masked_inputs(plan: Plan) -> frozenset[int]:
    """The plan's inputs of its masked modality: they feed zeros, so their faults (an empty text, an
    unreadable image) spoil no row."""
    return frozenset(i for i, inp in enumerate(plan.inputs) if inp.kind == plan.masked)


def _label_encoder(plan: Plan) -> Preprocessor:
    """The training transform reading only the label column of the plan's one task."""
    (head,) = plan.heads
    spec = TaskSpec(head.task, train=None, label_column=plan.label_column)
    info = TaskInfo(head.task, head.kind, list(head.labels), 0, 0, has_image=False, has_text=False)
    return Preprocessor(spec, info, plan.data)


def _local_tokenizer(data: DataSpec, model_path: str) -> DataSpec:
    """`data` with a tokenizer this process can load: when not on this node, the model folder's is
    fetched into a temporary folder, loaded (`load_tokenizer` caches it by that path) and removed."""
    if data.tokenizer is None or Path(data.tokenizer).is_dir():
        return data
    from raymtl.models.artifact import TOKENIZER_DIR

    with tempfile.TemporaryDirectory(prefix="raymtl_tokenizer_") as local:
        load_tokenizer(storage.download_dir(storage.join(model_path, TOKENIZER_DIR), local))
    return dataclasses.replace(data, tokenizer=local)


def _empty_texts(texts: pd.Series, inp: Input) -> np.ndarray:
    """Per row "" or why the text is unusable: missing or only whitespace."""
    empty = texts.fillna("").astype(str).str.strip().eq("").to_numpy()
    message = f"task {','.join(inp.tasks)!r}: empty text in column {inp.column!r}"
    return np.where(empty, message, "").astype(object)


def _join_errors(errors: list[np.ndarray]) -> np.ndarray:
    """One message per row from the per-input messages ("" for a good row)."""
    return np.array(["; ".join(m for m in row if m) for row in zip(*errors)], dtype=object)


class Predict:
    """Model actor: loads the artifact (every member of an ensemble) once. Per batch every input goes
    to the device once, each member runs one pass per task group and inputs, under the training's
    autocast, and every head's probabilities come back in one device-to-host copy."""

    def __init__(self, plan: Plan, use_gpu: bool, saved: Any = None) -> None:
        """`saved`: the plan's model already loaded in this process (`raymtl.load`), else loaded here."""
        import torch

        from raymtl.data.device_inputs import DeviceInputs
        from raymtl.models.artifact import load
        from raymtl.models.ensemble import members_of
        from raymtl.train.precision import for_inference

        self.device = torch.device("cuda" if use_gpu else "cpu")
        saved = load(plan.model_path) if saved is None else saved
        self.model = saved.model.to(self.device)
        self.members = members_of(self.model)  # an ensemble's weights read once: on a GPU each read is a sync
        self.precision = for_inference(self.device, saved.experiment)  # the training's autocast
        self.device_inputs = DeviceInputs(plan.data, self.device)
        for _, member in self.members:
            member.mask(plan.masked)
        self.masked_inputs = masked_inputs(plan)
        self.heads, self.top_k = plan.heads, plan.top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns = {ID: pa.array(batch[ID], pa.string())}
        for head, (probs, bad) in zip(self.heads, self.probabilities(batch)):
            columns.update(output_columns(head, probs, bad, self.top_k))
        errors = batch[ERROR]
        columns[ERROR] = pa.array(errors, pa.string(), mask=errors == "")
        return pa.table(columns)

    def probabilities(
        self, batch: dict[str, np.ndarray], heads: tuple[Head, ...] | None = None, masked: frozenset[int] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per head (the plan's, or `heads`): softmax (multiclass) or sigmoid (multilabel) probabilities,
        zeros on its bad rows, and the bad rows (an input of the head has an error, but for the `masked`
        inputs: the plan's, or those of the plan `heads` come from). An ensemble's are its members'
        weighted mean.

        Bad rows run through the model with the others (their placeholder inputs cost less than a
        selection of rows per head; in eval mode every row is computed on its own) and are zeroed after.
        """
        import torch

        from raymtl.models.ensemble import probabilities

        heads = self.heads if heads is None else heads
        masked = self.masked_inputs if masked is None else masked
        arrays = self._on_device(batch)
        features: dict[tuple, torch.Tensor] = {}  # tasks of one group with the same inputs share one pass
        outputs = []
        with torch.inference_mode(), self.precision.autocast():
            for head in heads:
                prefixes = tuple(f"{i}/" for i in head.inputs)
                inputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(prefixes)}
                total = 0.0
                for k, (weight, member) in enumerate(self.members):
                    key = (k, member.feature_key(head.task), head.inputs)
                    if key not in features:
                        features[key] = member.features(inputs, head.task)
                    total = total + weight * probabilities(member.heads[head.task](features[key]), head.kind)
                outputs.append(total)
        host = torch.cat(outputs, dim=1).cpu().numpy()  # the batch's one copy back
        out, start = [], 0
        for head in heads:
            probs = host[:, start : start + len(head.labels)].copy()
            start += len(head.labels)
            bad = np.zeros(len(batch[ID]), dtype=bool)
            for i in head.inputs:
                if i not in masked:
                    bad |= batch[f"{i}/{ERROR}"] != ""
            probs[bad] = 0.0
            out.append((probs, bad))
        return out

    def _on_device(self, batch: dict[str, np.ndarray]) -> dict:
        """Every input array ("<input>/<key>") on the model's device as the model takes it
        (`DeviceInputs`): one copy each per batch, from pinned memory on a GPU (asynchronous)."""
        from raymtl.data.device_inputs import host_tensor, is_numeric

        out = {}
        for key, value in batch.items():
            index, _, name = key.partition("/")
            if index.isdigit() and name != ERROR and is_numeric(value):
                tensor = host_tensor(value, pin=self.device.type == "cuda")
                out[key] = self.device_inputs.finish(name, tensor.to(self.device, non_blocking=True))
        return out
