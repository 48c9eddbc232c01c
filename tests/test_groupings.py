"""Grouping search: enumeration, the score, beam vs exact, and recovering planted task clusters."""

import math
import random

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from raymtl.config import ConfigError
from raymtl.data.planted import make_planted, planted_experiment, planted_tasks, resolve_clusters
from raymtl.train.affinity import AffinityTracker, lookahead_affinity, optimizer_update
from raymtl.tune.groupings import baseline_groupings, best_groupings, partitions, score_partition


def stirling2(n, k):
    return sum((-1) ** i * math.comb(k, i) * (k - i) ** n for i in range(k + 1)) // math.factorial(k)


@pytest.mark.parametrize("n", range(1, 8))
def test_partition_counts_are_bell_and_stirling_numbers(n):
    tasks = [f"t{i}" for i in range(n)]
    for k in range(1, n + 1):
        found = list(partitions(tasks, k))
        assert len(found) == sum(stirling2(n, j) for j in range(1, k + 1))
        canonical = {frozenset(frozenset(g) for g in p) for p in found}
        assert len(canonical) == len(found)  # each partition exactly once
        assert all(sorted(t for g in p for t in g) == tasks and len(p) <= k for p in found)
    assert len(list(partitions("abcd", 4))) == 15 and len(list(partitions("abcd", 2))) == 8


def test_score_by_hand():
    tasks = ["a", "b", "c"]
    z = torch.tensor([[9.0, 0.4, -0.2], [0.2, 9.0, 0.1], [0.3, -0.5, 9.0]])  # the diagonal never counts
    # a gets Z[b->a] = 0.2, b gets Z[a->b] = 0.4, c is alone
    assert score_partition([["a", "b"], ["c"]], z, tasks) == pytest.approx(0.6)
    # a: (0.2 + 0.3) / 2, b: (0.4 - 0.5) / 2, c: (-0.2 + 0.1) / 2
    assert score_partition({"g0": ["c", "b", "a"]}, z, tasks) == pytest.approx(0.15)
    assert score_partition([["a"], ["b"], ["c"]], z, tasks) == 0.0
    with pytest.raises(ValueError, match=r"tasks \['c'\] are in no task group of grouping"):
        score_partition([["a", "b"]], z, tasks)


@pytest.mark.parametrize("outsider", [0.0, -0.2])
def test_helpful_cluster_beats_merging_in_unrelated_or_conflicting_task(outsider):
    tasks = ["a", "b", "c", "d"]
    z = torch.full((4, 4), outsider)
    z[:3, :3] = 0.3
    best = best_groupings(z, tasks, max_groups=4, top=2)
    assert best[0][0] == {"g0": ["a", "b", "c"], "g1": ["d"]}
    assert best[0][1] > score_partition([tasks], z, tasks)


def test_beam_search_equals_exact_search():
    tasks = [f"t{i}" for i in range(7)]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        z = torch.randn(7, 7, generator=g)
        for k in (2, 3, 7):
            exact = best_groupings(z, tasks, k, top=3)
            beam = best_groupings(z, tasks, k, top=3, exact_limit=0)
            assert [p for p, _ in beam] == [p for p, _ in exact]
            assert [s for _, s in beam] == pytest.approx([s for _, s in exact])


def test_names_and_ties_are_deterministic():
    tasks = ["d", "b", "a", "c"]
    z = torch.zeros(4, 4)
    z[1, 3] = z[3, 1] = 1.0  # b and c help each other
    best = best_groupings(z, tasks, max_groups=3, top=2)
    assert [p for p, _ in best] == [  # score 2 twice: then by names; tasks sorted, groups by first task
        {"g0": ["a"], "g1": ["b", "c"], "g2": ["d"]},
        {"g0": ["a", "d"], "g1": ["b", "c"]},
    ]
    order = [2, 0, 3, 1]  # the same Z under another task order gives the same answer
    assert best_groupings(z[order][:, order], [tasks[i] for i in order], 3, top=2) == best


def test_baselines():
    assert baseline_groupings(["b", "a", "c"]) == {
        "one_group": {"g0": ["a", "b", "c"]},
        "one_per_task": {"g0": ["a"], "g1": ["b"], "g2": ["c"]},
    }


# ------------------------------------------------------------ the planted benchmark


def test_make_planted_writes_tables_and_images(tmp_path):
    catalogue = make_planted(tmp_path, seed=1, clusters=[["x", "y"], ["z"]], n_per_task=10, image_size=12)
    assert list(catalogue) == ["x", "y", "z"]
    ids = set()
    for task, paths in catalogue.items():
        train, val = pd.read_parquet(paths["train"]), pd.read_parquet(paths["val"])
        assert list(train.columns) == ["id", "image", "label"] and (len(train), len(val)) == (8, 2)
        assert set(train.label) | set(val.label) <= {0, 1}
        with Image.open(train.image[0]) as image:
            assert image.size == (12, 12) and image.mode == "RGB"
        ids |= set(train.id) | set(val.id)
    assert len(ids) == 30  # every task has its own items
    exp = planted_experiment(catalogue, str(tmp_path / "runs"), training={"epochs": 1}, name="p")
    assert exp.name == "p" and exp.training.epochs == 1 and exp.training.batch_size == 16
    assert exp.task_names == ["x", "y", "z"] and exp.task_groups() == {"all": ["x", "y", "z"]}
    assert exp.model.image_backbone == "resnet18" and exp.data.image_size == 16


def test_a_planted_test_split_leaves_train_and_validation_as_they_were(tmp_path):
    plain = make_planted(tmp_path / "a", n_per_task=10, latents_per_cluster=2)
    held = make_planted(tmp_path / "b", n_per_task=10, latents_per_cluster=2, n_test=6)
    for task in plain:
        for split in ("train", "val"):
            a, b = pd.read_parquet(plain[task][split]), pd.read_parquet(held[task][split])
            assert (a.id == b.id).all() and (a.label == b.label).all()
        test = pd.read_parquet(held[task]["test"])
        assert len(test) == 6 and not set(test.id) & set(pd.read_parquet(held[task]["train"]).id)
    assert "test" not in plain["c0_t0"]
    exp = planted_experiment(held, str(tmp_path / "runs"))
    assert exp.tasks[0].test == held["c0_t0"]["test"] and planted_experiment(plain, str(tmp_path)).tasks[0].test is None


def test_planted_tasks_are_deterministic():
    a, b = planted_tasks(3, n_per_task=8, image_size=8), planted_tasks(3, n_per_task=8, image_size=8)
    assert list(a) == ["c0_t0", "c0_t1", "c1_t0", "c1_t1"]
    assert all((a[t].images == b[t].images).all() and (a[t].labels == b[t].labels).all() for t in a)


class TinyMTL(nn.Module):
    """A narrow shared layer (the backbone) and a linear head per task: the clusters compete for
    4 tanh features. Same interface as MultiTaskModel (`forward(batch, task)`, `parts()`)."""

    def __init__(self, tasks, in_dim, hidden=4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, hidden), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, 2) for t in tasks})

    def parts(self):
        return {"image": list(self.backbone.parameters()), "text": [], "fusion": [],
                "heads": list(self.heads.parameters())}

    def forward(self, batch, task):
        return self.heads[task](self.backbone(batch["view_full"]))


def train_and_measure(seed, clusters, optimizer="sgd", steps=1500, warmup=150, every=10, size=8, n=512):
    """One task per step (as the trainer does), averaging lookahead affinity after a warm-up.

    The lookahead steps as the optimizer does (`optimizer_update`), as in the training loop.
    """
    data = planted_tasks(seed, clusters, n_per_task=n, image_size=size)
    images = {t: torch.from_numpy(d.images).permute(0, 3, 1, 2).float() / 64 - 2 for t, d in data.items()}
    labels = {t: torch.from_numpy(d.labels) for t, d in data.items()}
    tasks, losses = list(data), {t: F.cross_entropy for t in data}
    torch.manual_seed(seed)
    model = TinyMTL(tasks, 3 * size * size)
    if optimizer == "sgd":
        lr, optimizer = 0.1, torch.optim.SGD(model.parameters(), lr=0.1)
    else:  # a small model's Adam lr; the lookahead takes Adam's step, as in the loop
        lr, optimizer = 1e-2, torch.optim.AdamW(model.parameters(), lr=1e-2)
    update = optimizer_update(optimizer, model)
    rng = random.Random(seed)

    def batch(task, size):
        idx = torch.tensor(rng.sample(range(n), size))
        return {"view_full": images[task][idx], "label": labels[task][idx]}

    tracker = AffinityTracker(tasks)
    for step in range(steps):
        task = rng.choice(tasks)
        b = batch(task, 32)
        optimizer.zero_grad()
        F.cross_entropy(model(b, task), b["label"]).backward()
        optimizer.step()
        if step >= warmup and step % every == 0:
            tracker.update(lookahead_affinity(model, {t: batch(t, 256) for t in tasks}, losses, lr, update=update)[1])
    return tasks, tracker.mean()


@pytest.fixture
def one_thread():
    """Tiny ops: a second thread only adds sync overhead, and stalls badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_recovers_planted_clusters(seed, optimizer, one_thread):
    clusters = resolve_clusters([["a", "b", "c"], ["d", "e"]])
    tasks, z = train_and_measure(seed, clusters, optimizer)
    best = best_groupings(z, tasks, max_groups=len(tasks))  # every partition of the 5 tasks
    assert best[0][0] == {"g0": ["a", "b", "c"], "g1": ["d", "e"]}, (best, z)
    baselines = baseline_groupings(tasks).values()
    assert all(best[0][1] > score_partition(p, z, tasks) for p in baselines)


def test_search_refuses_a_non_finite_affinity_naming_the_pair():
    """NaN compares false with every score: a NaN-scored grouping ranked first and was trained as the best."""
    z = torch.tensor([[0, .5, -.1], [.5, 0, -.1], [float("nan"), -.1, 0]], dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"not finite for c -> a \(stepping task -> affected task\)"):
        best_groupings(z, ["a", "b", "c"], max_groups=3)
    z[2, 0] = float("inf")
    with pytest.raises(ConfigError, match="c -> a"):
        score_partition([["a", "b", "c"]], z, ["a", "b", "c"])
