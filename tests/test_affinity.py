"""Lookahead affinity: the formula by hand, no side effects on the model, tracker and heatmap."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from raymtl.config import ConfigError, ModelSpec
from raymtl.data.task_info import TaskInfo
from raymtl.models.multitask import MultiTaskModel
from raymtl.tune.spec import affinity_interval
from raymtl.train.affinity import (
    AffinityTracker,
    CELL,
    RecentRows,
    lookahead_affinity,
    optimizer_update,
    plot_heatmap,
    shared_parameter_names,
)
from raymtl.tune.groupings import best_groupings

TASKS = ["a", "b", "c"]


class LinearMTL(nn.Module):
    """features = W x (shared), logits = V_task features (one head per task)."""

    def __init__(self, tasks, d_in=4, d_hidden=3, extras=()):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(d_in, d_hidden, bias=False), *extras)
        self.heads = nn.ModuleDict({t: nn.Linear(d_hidden, 1, bias=False) for t in tasks})

    def parts(self):
        return {"image": list(self.shared.parameters()), "text": [], "fusion": [],
                "heads": list(self.heads.parameters())}

    def forward(self, batch, task):
        return self.heads[task](self.shared(batch["x"])).squeeze(-1)


def mse(pred, target):
    return ((pred - target) ** 2).mean()


def batches(tasks, n=5, d_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t: {"x": torch.randn(n, d_in, generator=g), "label": torch.randn(n, generator=g)} for t in tasks}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"


def test_lookahead_matches_hand_computation():
    torch.manual_seed(0)
    model, data, lr = LinearMTL(TASKS), batches(TASKS), 0.3
    W = model.shared[0].weight.detach()
    V = {t: model.heads[t].weight.detach()[0] for t in TASKS}

    def loss(w, t):
        x, y = data[t]["x"], data[t]["label"]
        return (((x @ w.T) @ V[t] - y) ** 2).mean()

    def grad(t):  # d/dW mean((V W x - y)^2) = 2/n sum_b r_b V x_b^T
        x, y = data[t]["x"], data[t]["label"]
        r = (x @ W.T) @ V[t] - y
        return 2 / len(y) * torch.outer(V[t], r @ x)

    expected = torch.tensor([[1 - loss(W - lr * grad(i), j) / loss(W, j) for j in TASKS] for i in TASKS])
    tasks, z = lookahead_affinity(model, data, {t: mse for t in TASKS}, lr)
    assert tasks == TASKS
    assert torch.allclose(z.float(), expected, atol=1e-6)
    assert (z.diagonal() > 0).all()  # a small step on a task lowers its own loss


def test_shared_defaults_to_everything_but_heads_and_can_be_narrowed():
    model = LinearMTL(TASKS, extras=[nn.Linear(3, 3)])
    assert shared_parameter_names(model) == ["shared.0.weight", "shared.1.weight", "shared.1.bias"]
    data, losses = batches(TASKS), {t: mse for t in TASKS}
    _, z_all = lookahead_affinity(model, data, losses, 0.1)
    _, z_one = lookahead_affinity(model, data, losses, 0.1, shared=["shared.1.bias"])
    assert not torch.allclose(z_one, z_all)
    for bad in ([], ["shared.9.weight"]):
        with pytest.raises(ValueError, match="shared parameters"):
            lookahead_affinity(model, data, losses, 0.1, shared=bad)


def test_model_untouched_and_dropout_switched_off():
    """BatchNorm in train mode would update its running stats; dropout would make Z random."""
    torch.manual_seed(0)
    model = LinearMTL(TASKS, extras=[nn.BatchNorm1d(3), nn.Dropout(0.5)]).train()
    model.heads["b"].eval()  # a mixed-mode model gets every module's own mode back
    before = snapshot(model)
    modes = {name: m.training for name, m in model.named_modules()}
    optimizer = torch.optim.Adam(model.parameters())
    data, losses = batches(TASKS, n=8), {t: mse for t in TASKS}
    _, z1 = lookahead_affinity(model, data, losses, 0.1)
    _, z2 = lookahead_affinity(model, data, losses, 0.1)
    assert torch.equal(z1, z2)
    assert_unchanged(model, before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_lookahead_is_the_optimizers_own_step(kind):
    """Without momentum (beta1 = 0) or decay, Adam's step for g is exactly lr * update(g)."""
    torch.manual_seed(0)
    model, data, lr = LinearMTL(TASKS), batches(TASKS), 0.01
    optimizer = kind(model.parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=0.0)
    update = optimizer_update(optimizer, model)
    for t in [*TASKS, "a"]:  # some Adam state first, then a fresh step compared
        optimizer.zero_grad()
        mse(model(data[t], t), data[t]["label"]).backward()
        stepped = {n: p for n, p in model.named_parameters() if p.grad is not None}  # other heads: no grad
        expected = {n: -lr * update(n, p.grad) for n, p in stepped.items()}
        before = snapshot(model)
        optimizer.step()
        for n, p in stepped.items():
            torch.testing.assert_close(p.detach() - before[n], expected[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_lookahead_steps_each_parameter_at_its_groups_lr(momentum):
    """The text encoder's group runs at a tenth of the lr: its lookahead step is lr/10 * g, as SGD's own step."""
    torch.manual_seed(0)
    model, data = LinearMTL(TASKS), batches(TASKS)
    optimizer = torch.optim.SGD([{"params": model.shared.parameters(), "lr": 1.0},
                                 {"params": model.heads.parameters(), "lr": 0.1}], momentum=momentum)
    update = optimizer_update(optimizer, model)
    mse(model(data["a"], "a"), data["a"]["label"]).backward()
    stepped = {n: p for n, p in model.named_parameters() if p.grad is not None}
    lookahead = {n: -optimizer.param_groups[0]["lr"] * update(n, p.grad) for n, p in stepped.items()}
    before = snapshot(model)
    optimizer.step()  # the first step of momentum SGD is its gradient too
    for n, p in stepped.items():
        lr = 1.0 if n.startswith("shared") else 0.1
        torch.testing.assert_close(lookahead[n], -lr * p.grad)
        torch.testing.assert_close(p.detach() - before[n], lookahead[n])


def test_adam_lookahead_does_not_depend_on_the_gradients_scale():
    """Adam steps the same for a loss scaled by 1e-3 (as a real net's tiny gradients); a raw step shrinks."""
    torch.manual_seed(0)
    model, data, lr = LinearMTL(TASKS), batches(TASKS), 1e-3
    update = optimizer_update(torch.optim.AdamW(model.parameters(), lr=lr), model)
    plain, scaled = {t: mse for t in TASKS}, {t: lambda p, y: 1e-3 * mse(p, y) for t in TASKS}
    _, raw = lookahead_affinity(model, data, plain, lr)
    _, raw_scaled = lookahead_affinity(model, data, scaled, lr)
    _, adam = lookahead_affinity(model, data, plain, lr, update=update)
    _, adam_scaled = lookahead_affinity(model, data, scaled, lr, update=update)
    torch.testing.assert_close(adam_scaled, adam, rtol=1e-2, atol=2e-5)  # float32 losses
    assert raw_scaled.abs().max() < 1e-2 * raw.abs().max()  # ~1e-3 of it, below float32's resolution of Z
    assert (adam.diagonal() > 0).all()  # a task's own step lowers its own loss


def test_recent_rows_keep_each_tasks_latest_rows_across_batches():
    recent = RecentRows(rows=5)
    for start in (0, 3, 6):  # batches of 3 rows: 0-2, 3-5, 6-8
        recent.add("a", {"x": torch.arange(start, start + 3), "label": torch.arange(start, start + 3)})
    assert not recent.has(["a", "b"])
    recent.add("b", {"x": torch.tensor([9, 10]), "label": torch.tensor([1, 0])})
    assert recent.has(["a", "b"])
    assert recent.get("a")["x"].tolist() == [4, 5, 6, 7, 8] == recent.get("a")["label"].tolist()
    assert len(recent.batches["a"]) == 2  # the first batch is no longer needed
    assert recent.get("b")["x"].tolist() == [9, 10]  # fewer rows than asked: what there is


def test_real_multitask_model_untouched():
    infos = {t: TaskInfo(t, "multiclass", ["0", "1"], 8, 4, True, False) for t in ("x", "y")}
    spec = ModelSpec(image_backbone="resnet18", hidden_dim=8, dropout=0.1)
    model = MultiTaskModel(spec, infos, ["full"], {"all": ["x", "y"]}).train()
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1, 0])
    data = {t: {"view_full": torch.randn(4, 3, 16, 16, generator=g), "label": labels} for t in infos}
    before = snapshot(model)
    names = shared_parameter_names(model)
    assert names and not any(n.startswith("heads.") for n in names)
    tasks, z = lookahead_affinity(model, data, {t: F.cross_entropy for t in infos}, 0.05)
    assert tasks == ["x", "y"] and z.shape == (2, 2) and torch.isfinite(z).all()
    assert_unchanged(model, before)  # BatchNorm running stats included
    assert model.training


def test_tracker_mean_state_and_json(tmp_path):
    tracker = AffinityTracker(TASKS)
    with pytest.raises(ValueError, match="no affinity"):
        tracker.mean()
    z1, z2 = torch.arange(9.0).view(3, 3), -torch.ones(3, 3)
    tracker.update(z1)
    tracker.update(z2)
    assert torch.allclose(tracker.mean(), ((z1 + z2) / 2).double())
    with pytest.raises(ValueError, match="shape"):
        tracker.update(torch.zeros(2, 2))

    restored = AffinityTracker(TASKS)
    restored.load_state_dict(tracker.state_dict())
    assert restored.count == 2 and torch.equal(restored.mean(), tracker.mean())
    with pytest.raises(ValueError, match="tasks"):
        AffinityTracker(["a", "b", "z"]).load_state_dict(tracker.state_dict())

    saved = json.loads(tracker.save(tmp_path / "affinity" / "z.json").read_text())
    assert saved["tasks"] == TASKS and saved["count"] == 2
    assert saved["affinity"]["a"]["c"] == pytest.approx(0.5)  # mean of Z[a, c] = 2 and -1


def test_heatmap_png(tmp_path):
    names = ["colour", "pattern", "sleeve_length"]
    z = torch.tensor([[0.9, 0.5, 0.0], [0.25, 0.7, -0.5], [0.1, -0.2, 0.8]])
    path = plot_heatmap(z, names, tmp_path / "plots" / "affinity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.mode == "RGB"
        w, h = image.size
        assert 3 * CELL < w < 3 * CELL + 400 and 3 * CELL < h < 3 * CELL + 400
        colours = {c for _, c in image.getcolors(w * h)}
    # +-0.5 are the largest |Z| off the diagonal: they get the full blue and red
    assert (33, 102, 172) in colours and (178, 24, 43) in colours


TINY_BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=16)


class Method(nn.Module):
    """`model.<method>` as a module's forward, for `functional_call`."""

    def __init__(self, model, method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, batch, task):
        return getattr(self.model, self.method)(batch, task)


def reference_affinity(model, grad_batches, eval_batches, losses, lr, update):
    """Z by the formula: one step tensor per task (its training loss's gradient), one pass per (source, target)."""
    tasks = list(grad_batches)
    names = shared_parameter_names(model)
    theta = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters() if n in names}
    frozen = {n: b.clone() for n, b in model.named_buffers()}

    def outputs(params, task, batch, method):
        state = {f"model.{n}": v for n, v in {**{n: b.clone() for n, b in frozen.items()}, **params}.items()}
        return torch.func.functional_call(Method(model, method), state, args=(batch, task))

    def loss(params, task, batch):
        return losses[task](outputs(params, task, batch, "forward"), batch["label"])

    def training_loss(params, task, batch):  # the training step's: every head at its weight
        if not isinstance(model, MultiTaskModel):
            return loss(params, task, batch)
        heads = outputs(params, task, batch, "training_outputs")
        return sum(losses[task](logits, batch["label"]) * w for logits, w in heads)

    modes = {m: m.training for m in model.modules()}
    for m in model.modules():  # dropout off, BatchNorm as it was (what _deterministic does)
        if not any(isinstance(s, torch.nn.modules.batchnorm._BatchNorm) for s in m.modules()):
            m.training = False
    steps = {}
    for t in tasks:
        grads = torch.autograd.grad(training_loss(theta, t, grad_batches[t]), list(theta.values()), allow_unused=True)
        steps[t] = {n: update(n, g) for n, g in zip(names, grads) if g is not None}
    z = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    with torch.no_grad():
        before = {t: loss(theta, t, eval_batches[t]).double() for t in tasks}
        for i, s in enumerate(tasks):
            moved = {n: p - lr * steps[s][n] if n in steps[s] else p for n, p in theta.items()}
            for j, t in enumerate(tasks):
                z[i, j] = 1 - loss(moved, t, eval_batches[t]).double() / before[t]
    for m, mode in modes.items():
        m.training = mode
    return z


MIXED = {"img": (True, False), "txt": (False, True), "both": (True, True), "both2": (True, True)}


def mixed_model_and_data(rows=8, kinds=MIXED, views=("full",), weights=None):
    """Image-only, text-only and image+text tasks (`kinds`: task -> has image, has text) in one group,
    resnet18 (BatchNorm in train mode) over `views`, `rows` rows per task (or {task: rows})."""
    infos = {t: TaskInfo(t, "multiclass", ["0", "1", "2"], 8, 4, i, x, weight=(weights or {}).get(t, 1.0))
             for t, (i, x) in kinds.items()}
    spec = ModelSpec(image_backbone="resnet18", text_config=TINY_BERT, hidden_dim=8, dropout=0.1)
    torch.manual_seed(0)
    model = MultiTaskModel(spec, infos, list(views), {"all": list(infos)}).train()
    g = torch.Generator().manual_seed(1)
    data = {}
    for t, (image, text) in kinds.items():
        n = rows[t] if isinstance(rows, dict) else rows
        b = {"label": torch.randint(0, 3, (n,), generator=g)}
        for view in views if image else ():
            b[f"view_{view}"] = torch.randn(n, 3, 32, 32, generator=g)
        if text:
            b["input_ids"] = torch.randint(1, 60, (n, 5), generator=g)
            b["attention_mask"] = torch.ones(n, 5, dtype=torch.long)
        data[t] = b
    return model, data, {t: F.cross_entropy for t in infos}


def adam_after_one_step(model, data, losses):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses["img"](model(data["img"], task="img"), data["img"]["label"]).backward()
    opt.step()
    opt.zero_grad()
    return optimizer_update(opt, model)


@pytest.mark.parametrize("lookahead_rows", [None, 32, 1000])
def test_batched_lookahead_equals_the_formula_pair_by_pair(lookahead_rows):
    """One reused step buffer and one batched pass per source give the per-pair Z (BatchNorm per task)."""
    model, data, losses = mixed_model_and_data()
    update = adam_after_one_step(model, data, losses)
    before = snapshot(model)
    tasks, z = lookahead_affinity(model, data, losses, 1e-3, update=update, lookahead_rows=lookahead_rows)
    expected = reference_affinity(model, data, data, losses, 1e-3, update)
    assert tasks == list(data)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-6)
    assert_unchanged(model, before)
    assert model.training


def test_capped_lookahead_rows_evaluate_each_targets_latest_rows():
    """lookahead_rows=16 over 4 tasks: each step is judged on each target's latest 4 rows, before and after."""
    model, data, losses = mixed_model_and_data()
    update = adam_after_one_step(model, data, losses)
    _, z = lookahead_affinity(model, data, losses, 1e-3, update=update, lookahead_rows=16)
    latest = {t: {k: v[-4:] for k, v in b.items()} for t, b in data.items()}
    # float32 lookahead differences land ~1e-6 apart on different CPUs
    torch.testing.assert_close(z, reference_affinity(model, data, latest, losses, 1e-3, update), rtol=1e-4, atol=1e-5)
    full = reference_affinity(model, data, data, losses, 1e-3, update)
    assert not torch.allclose(z, full, rtol=1e-4, atol=1e-5)  # the rows do matter: the cap is in effect


def test_affinity_interval_keeps_the_measurement_a_tenth_of_training():
    every = {t: affinity_interval(t, rows=64, lookahead_rows=512, batch_size=16) for t in (4, 8, 32)}
    assert every[4] == math.ceil((3 * 4 * 64 + 4 * 4 * 64) / 4.8)  # keep all 64 rows: T passes
    assert every[32] == math.ceil((3 * 32 * 64 + 33 * 32 * 16) / 4.8)
    assert every[4] < every[8] < every[32] < 5 * every[8]  # linear in T once the cap holds (T=32: T+1 passes)


def test_lookahead_step_keeps_the_lr_ratio_of_groups_during_a_warmup_at_lr_zero():
    """A warm-up's first step has lr 0 in every group: the step is still the groups' ratio, not 0/0."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                                   {"params": model[1].parameters(), "lr": 1e-4}])
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 10)  # lr 0 now
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    update = optimizer_update(optimizer, model)
    grad = torch.ones(3, 3)
    first, second = update("0.weight", grad), update("1.weight", torch.ones(2, 3))
    assert torch.isfinite(first).all() and torch.allclose(second[0, 0] / first[0, 0], torch.tensor(0.1))


@pytest.mark.parametrize("lookahead_rows", [None, 6])
def test_affinity_is_computed_on_the_parameters_device(lookahead_rows):
    """On a GPU the losses are there: Z must be made there too, with or without a row cap (with one, the
    losses before any step are measured again on the capped rows). The meta device stands in for a GPU."""
    model = LinearMTL(TASKS).to("meta")
    data = {t: {k: v.to("meta") for k, v in b.items()} for t, b in batches(TASKS, n=8).items()}
    tasks, z = lookahead_affinity(model, data, {t: mse for t in TASKS}, 0.1, lookahead_rows=lookahead_rows)
    assert tasks == TASKS and z.device.type == "meta" and z.shape == (3, 3) and z.dtype == torch.float64


@pytest.mark.parametrize("rows", [dict(a=8, b=8, c=8), dict(a=8, b=6, c=3)])
def test_batched_lookahead_over_two_views_equals_the_formula_pair_by_pair(rows):
    """The trunk sees every view of every task in one batch (view-major): BatchNorm statistics stay per task."""
    model, data, losses = mixed_model_and_data(rows, kinds=dict.fromkeys(rows, (True, False)), views=["front", "back"])
    before = snapshot(model)
    _, z = lookahead_affinity(model, data, losses, 0.1)
    torch.testing.assert_close(z, reference_affinity(model, data, data, losses, 0.1, lambda n, g: g),
                               rtol=1e-4, atol=1e-5)
    assert_unchanged(model, before)


def test_lookahead_step_is_the_optimizers_step_on_the_training_loss():
    """The step is the one training takes: the per-modality heads' losses (modality_loss) and the task weight."""
    weights = {"img": 3.0, "txt": 1.0, "both": 0.5, "both2": 1.0}
    model, data, losses = mixed_model_and_data(weights=weights)
    model.eval()  # no dropout; the lookahead keeps BatchNorm's mode, and so does the deep copy below
    lr = 0.5
    update = optimizer_update(torch.optim.SGD(model.parameters(), lr=lr), model)
    tasks, z = lookahead_affinity(model, data, losses, lr, update=update, weights=weights)
    with torch.no_grad():
        before = [F.cross_entropy(model(data[t], t), data[t]["label"]).double() for t in tasks]
    for i, s in enumerate(tasks):
        stepped = copy.deepcopy(model)
        outputs = stepped.training_outputs(data[s], s)
        (sum(F.cross_entropy(logits, data[s]["label"]) * w for logits, w in outputs) * weights[s]).backward()
        for p in stepped.parts()["heads"]:  # the lookahead moves the shared parameters only
            p.grad = None
        torch.optim.SGD(stepped.parameters(), lr=lr).step()
        with torch.no_grad():
            for j, t in enumerate(tasks):
                real = 1 - F.cross_entropy(stepped(data[t], t), data[t]["label"]).double() / before[j]
                assert z[i, j] == pytest.approx(float(real), abs=1e-4), (s, t)


def test_a_task_whose_loss_is_zero_has_zero_affinity():
    """A fit task (its loss ~0 before the step) gains or loses nothing measurable: its column is 0, not 1."""
    losses = {"a": mse, "b": mse, "c": lambda pred, y: 0 * mse(pred, y)}
    _, z = lookahead_affinity(LinearMTL(TASKS), batches(TASKS), losses, 0.1)
    assert torch.equal(z[:, 2], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(z[2], torch.zeros(3, dtype=torch.float64))  # its zero gradient moves nothing
    assert (z[:2, :2].diagonal() > 0).all()


def test_a_negative_loss_is_refused_naming_the_task():
    """Z is a ratio of losses: a loss below 0 (a Gaussian NLL, say) gave ~1e13, now an error naming the task."""
    losses = {"a": mse, "b": lambda pred, y: mse(pred, y) - 10.0, "c": mse}
    with pytest.raises(ConfigError, match=r"task 'b'.* negative \(-9\.\d+\).*>= 0"):
        lookahead_affinity(LinearMTL(TASKS), batches(TASKS), losses, 0.1)


def test_tracker_skips_a_non_finite_measurement_and_says_which_tasks(caplog):
    """One NaN in the running total made the mean NaN for the rest of the run, and the search ranked NaN first."""
    tracker = AffinityTracker(TASKS)
    good = torch.tensor([[0, .5, -.1], [.5, 0, -.1], [-.1, -.1, 0]], dtype=torch.float64)
    for _ in range(9):
        tracker.update(good)
    bad = good.clone()
    bad[2, 0] = float("nan")
    with caplog.at_level("WARNING", logger="raymtl"):
        tracker.update(bad)
    assert "c -> a" in caplog.text and "skipped" in caplog.text
    assert tracker.count == 9 and tracker.skipped == 1
    torch.testing.assert_close(tracker.mean(), good)
    restored = AffinityTracker(TASKS)
    restored.load_state_dict(tracker.state_dict())
    assert restored.skipped == 1 and tracker.to_dict()["skipped"] == 1
    (best, _), *_ = best_groupings(tracker.mean(), tracker.tasks, max_groups=3, top=3)
    assert best == {"g0": ["a", "b"], "g1": ["c"]}


def test_a_search_run_whose_every_measurement_was_skipped_says_so(tmp_path):
    """Its affinity.json was never written, and the search blamed affinity_every_steps."""
    from raymtl.train.report import RunFiles
    from raymtl.tune.candidates import read_affinity

    tracker = AffinityTracker(TASKS)
    for _ in range(3):
        tracker.update(torch.full((3, 3), float("nan"), dtype=torch.float64))
    RunFiles(str(tmp_path)).log_affinity(tracker)
    with pytest.raises(ConfigError, match=r"every affinity measurement of the search run \(3\) had a non-finite "
                                          r"loss"):
        read_affinity(str(tmp_path))
