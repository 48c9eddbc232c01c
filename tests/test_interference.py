"""The planted interference is real: with a narrow shared representation, tasks of two clusters
that read disjoint latents do worse in one backbone than in one backbone per cluster.

Plain torch, no Ray: a one-layer ReLU backbone per group over the flattened planted images, a head
per task, the same steps per task for both groupings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raymtl.data.planted import planted_tasks

WIDTH = 4  # the shared representation: two latents per cluster need about 2 units each


def accuracy(tasks: dict, groups: dict[str, list[str]], steps: int = 600, seed: int = 0) -> float:
    """Mean validation accuracy (last fifth of each task's items) after training `groups`."""
    torch.manual_seed(seed)
    data = {t: (torch.tensor(d.images.reshape(len(d.labels), -1) / 255.0 - 0.5, dtype=torch.float32),
                torch.tensor(d.labels)) for t, d in tasks.items()}
    dim = next(iter(data.values()))[0].shape[1]
    backbones = {g: nn.Sequential(nn.Linear(dim, WIDTH), nn.ReLU()) for g in groups}
    owner = {t: g for g, members in groups.items() for t in members}
    heads = {t: nn.Linear(WIDTH, 2) for t in data}
    modules = [*backbones.values(), *heads.values()]
    optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-3)
    names = list(data)
    for step in range(steps):
        task = names[step % len(names)]
        x, y = data[task]
        rows = torch.randint(0, int(0.8 * len(y)), (16,))
        loss = nn.functional.cross_entropy(heads[task](backbones[owner[task]](x[rows])), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = []
    with torch.no_grad():
        for task, (x, y) in data.items():
            n = int(0.8 * len(y))
            scores.append((heads[task](backbones[owner[task]](x[n:])).argmax(1) == y[n:]).float().mean().item())
    return float(np.mean(scores))


@pytest.mark.slow  # trains two models (~90 s on 2 cores)
def test_shared_backbone_is_worse_than_one_backbone_per_cluster():
    shared, separate = [], []
    for seed in (0, 1):
        tasks = planted_tasks(seed, n_per_task=400, latents_per_cluster=2)
        clusters = {c: [t for t in tasks if t.startswith(c)] for c in ("c0", "c1")}
        shared.append(accuracy(tasks, {"all": list(tasks)}))
        separate.append(accuracy(tasks, clusters))
    assert np.mean(separate) > 0.8  # the features are learnable when they do not compete
    assert np.mean(shared) < np.mean(separate) - 0.05, (shared, separate)

