"""Plain data -> dataclasses: a fault inside a union-typed value is reported as itself, not as another member's."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from raymtl.config import ConfigError, load_experiment
from raymtl.convert import from_dict


@dataclass
class Span:
    min: float
    max: float


@dataclass
class Holder:
    span: list[float] | Span | None = None
    workers: int | list[int] = 1
    groups: dict[str, list[str]] | None = None


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"span": {"min": 1, "maxx": 2}}, r"unknown key 'h.span.maxx' \(did you mean 'max'\?\)"),
        ({"span": {"min": 1}}, "missing required key 'h.span.max'"),
        ({"span": {"min": 1, "max": "2x"}}, "h.span.max: expected float, got '2x'"),
        ({"span": [1, "2x"]}, r"h.span\[1\]: expected float, got '2x'"),
        ({"span": "wide"}, "h.span: expected a list or a mapping, got 'wide'"),
        ({"workers": [1, "2"]}, r"h.workers\[1\]: expected int, got '2'"),
        ({"workers": 2.5}, "h.workers: expected int or a list, got 2.5"),
        ({"workers": {"n": 2}}, r"h.workers: expected int or a list, got \{'n': 2\}"),
    ],
)
def test_a_union_reports_the_fault_of_the_member_the_value_is_shaped_like(raw, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        from_dict(Holder, raw, "h")


@pytest.mark.parametrize("key", [1, True, None, 1.5])
def test_a_mapping_key_must_be_a_string(key):
    with pytest.raises(ConfigError, match=f"^h.groups.{key}: keys here are strings, got {type(key).__name__} {key}"):
        from_dict(Holder, {"groups": {key: ["a"]}}, "h")


def test_a_yaml_number_as_group_name_is_refused_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: e\ntasks:\n  - {name: a, train: a.csv, image_column: image}\nmodel:\n  groups: {1: [a]}\n")
    with pytest.raises(ConfigError, match=f"^{path}: model.groups.1: keys here are strings, got int 1"):
        load_experiment(path)
