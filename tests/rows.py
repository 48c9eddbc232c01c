"""Reading the rows a run trained on (`raymtl.train.elastic.ROWS_ENV`): what tests of exact
continuation count. Steps logged after the checkpoint a worker group resumed from are redone, so
they are dropped when the resume is logged."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from raymtl.train.elastic import ROWS_ENV


@contextlib.contextmanager
def logging_rows(folder: Path) -> Iterator[Path]:
    """Every rank of the runs started inside logs each step's rows to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ROWS_ENV, str(folder))
        yield folder


def kept_steps(folder: Path) -> list[dict]:
    """Each rank's logged steps that the run kept (in time order), resumes applied."""
    lines = [json.loads(line) for f in sorted(folder.glob("rows-*.jsonl")) for line in f.read_text().splitlines()]
    kept: list[dict] = []
    for line in sorted(lines, key=lambda r: r["t"]):
        if "resume" in line:
            kept = [k for k in kept if k["g"] <= line["resume"]]
        else:
            kept.append(line)
    return kept


def rows_read(steps: list[dict]) -> dict[tuple[int, str], Counter]:
    """{(epoch, task): how often each row was trained on}."""
    out: dict[tuple[int, str], Counter] = {}
    for step in steps:
        out.setdefault((step["epoch"], step["task"]), Counter()).update(step["rows"])
    return out


def lr_at(steps: list[dict]) -> dict[int, float]:
    """{global samples before a step: the LR it trained with}."""
    return {step["at"]: step["lr"] for step in steps}
