"""Task-grouping search over an inter-task affinity matrix (TAG, Fifty et al. 2021).

A grouping assigns every task to exactly one task group (one backbone per group). Its score is

    score(P) = sum over tasks j of  mean_{i in group(j), i != j} Z[i, j]      (0 if j is alone)
             = sum over groups g with |g| > 1 of  (sum_{i != j in g} Z[i, j]) / (|g| - 1)

i.e. how much, on average, a task's group-mates' updates lower its loss. Averaging (not summing)
makes a tight cluster of mutually helpful tasks beat the same cluster plus unrelated (Z ~ 0) or
conflicting (Z < 0) tasks: those drag every member's mean down. Splitting a helpful cluster loses
the help the parts gave each other, and a singleton gains nothing, so each task wants the company
that helps it most. The diagonal (self-affinity) never enters.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from raymtl.config import ConfigError, check_groups

T = TypeVar("T")
Partition = tuple[tuple[str, ...], ...]
Grouping = dict[str, list[str]]  # group name -> tasks, as in ModelSpec.groups


def partitions(tasks: Sequence[T], max_groups: int) -> Iterator[tuple[tuple[T, ...], ...]]:
    """Every partition of `tasks` into at most `max_groups` non-empty groups, each exactly once.

    Tasks are placed in order, each into an existing group or a new one (a restricted-growth
    string), so groups never appear in two orders. Bell(n) partitions in all: fine up to ~10 tasks.
    """
    _check_max_groups(max_groups)
    items = list(tasks)

    def place(done: int, groups: tuple[tuple[T, ...], ...]) -> Iterator[tuple[tuple[T, ...], ...]]:
        if done == len(items):
            yield groups
            return
        for _, grown in _placements(groups, items[done], max_groups):
            yield from place(done + 1, grown)

    yield from place(0, ())


def score_partition(
    partition: Iterable[Sequence[str]] | Mapping[str, Sequence[str]], z: Tensor, tasks: Sequence[str]
) -> float:
    """The module-level score of a grouping (groups as sequences, or a {group: tasks} dict)."""
    groups = list(partition.values()) if isinstance(partition, Mapping) else list(partition)
    check_groups(dict(enumerate(groups)), list(tasks), "grouping")
    index = {t: k for k, t in enumerate(tasks)}
    matrix = _matrix(z, tasks)
    return sum(_group_score([index[t] for t in g], matrix) for g in groups)


def best_groupings(
    z: Tensor,
    tasks: Sequence[str],
    max_groups: int,
    top: int = 3,
    exact_limit: int = 10,
    beam_width: int = 512,
) -> list[tuple[Grouping, float]]:
    """The `top` highest-scoring groupings into at most `max_groups` groups, best first.

    Exhaustive up to `exact_limit` tasks; beyond, a beam search places tasks one by one (into an
    existing group or a new one) and keeps the `beam_width` best partial groupings by their score
    so far. Equal scores rank by the groupings' names, so the answer is deterministic.
    """
    _check_max_groups(max_groups)
    matrix = _matrix(z, tasks)
    if len(tasks) <= exact_limit:
        everything = partitions(range(len(tasks)), max_groups)
        scored = ((p, sum(_group_score(g, matrix) for g in p)) for p in everything)
    else:
        scored = _beam_search(matrix, max_groups, beam_width)
    best = heapq.nsmallest(top, scored, key=lambda ps: _rank_key(ps, tasks))
    return [(_named(p, tasks), score) for p, score in best]


def baseline_groupings(tasks: Sequence[str]) -> dict[str, Grouping]:
    """The groupings a search must beat: every task in one group, and one group per task."""
    return {
        "one_group": _named((tuple(range(len(tasks))),), tasks),
        "one_per_task": _named(tuple((k,) for k in range(len(tasks))), tasks),
    }


def non_finite_pairs(z: Tensor, tasks: Sequence[str], most: int = 5) -> str:
    """The first `most` (stepping -> affected) task pairs where Z is NaN or infinite, "" if none."""
    rows, cols = torch.nonzero(~torch.isfinite(z), as_tuple=True)
    pairs = [f"{tasks[i]} -> {tasks[j]}" for i, j in zip(rows.tolist(), cols.tolist())]
    return ", ".join(pairs[:most]) + (f" and {len(pairs) - most} more" if len(pairs) > most else "")


# ------------------------------------------------------------ internals (groups of task indices)

IndexPartition = tuple[tuple[int, ...], ...]


def _placements(
    groups: tuple[tuple[T, ...], ...], item: T, max_groups: int
) -> Iterator[tuple[int, tuple[tuple[T, ...], ...]]]:
    """(index of the group `item` joins, the grown groups) for each way to place it."""
    for k, group in enumerate(groups):
        yield k, groups[:k] + (group + (item,),) + groups[k + 1 :]
    if len(groups) < max_groups:
        yield len(groups), groups + ((item,),)


def _group_score(group: Sequence[int], z: list[list[float]]) -> float:
    """Sum over members j of the mean Z[i, j] over the other members i (the module formula)."""
    if len(group) < 2:
        return 0.0
    return sum(z[i][j] for i in group for j in group if i != j) / (len(group) - 1)


def _beam_search(z: list[list[float]], max_groups: int, width: int) -> list[tuple[IndexPartition, float]]:
    """Complete groupings with their scores, grown task by task keeping the `width` best."""
    if width < 1:
        raise ValueError(f"beam_width must be >= 1, got {width}")
    beam: list[tuple[IndexPartition, tuple[float, ...]]] = [((), ())]  # groups, score of each group
    order = range(len(z))
    for task in order:
        grown = [
            (child, scores[:k] + (_group_score(child[k], z),) + scores[k + 1 :])
            for parent, scores in beam
            for k, child in _placements(parent, task, max_groups)
        ]
        beam = heapq.nsmallest(width, grown, key=lambda gs: _rank_key((gs[0], sum(gs[1])), order))
    return [(groups, sum(scores)) for groups, scores in beam]


def _rank_key(scored: tuple[IndexPartition, float], tasks: Sequence[T]) -> tuple:
    """Higher score first (rounded so float noise cannot reorder ties), then canonical order."""
    groups, score = scored
    return (-round(score, 9), _canonical(groups, tasks))


def _canonical(groups: IndexPartition, tasks: Sequence[T]) -> tuple[tuple[T, ...], ...]:
    """Tasks sorted within each group, groups ordered by their first task."""
    return tuple(sorted(tuple(sorted(tasks[k] for k in g)) for g in groups))


def _named(groups: IndexPartition, tasks: Sequence[str]) -> Grouping:
    return {f"g{k}": list(g) for k, g in enumerate(_canonical(groups, tasks))}


def _matrix(z: Tensor, tasks: Sequence[str]) -> list[list[float]]:
    """Z as nested Python floats: the search does scalar arithmetic, where lists beat tensors."""
    values = torch.as_tensor(z, dtype=torch.float64)
    if values.shape != (len(tasks), len(tasks)):
        raise ValueError(f"affinity of shape {tuple(values.shape)} for {len(tasks)} tasks")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {list(tasks)}")
    bad = non_finite_pairs(values, tasks)
    if bad:  # NaN would rank first (it compares false with every score) and decide the search
        raise ConfigError(f"the affinity is not finite for {bad} (stepping task -> affected task): "
                          "no grouping can be scored by it; measure it again")
    return values.tolist()


def _check_max_groups(max_groups: int) -> None:
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
