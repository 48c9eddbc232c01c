"""Inter-task affinity by lookahead (Fifty et al. 2021, "Efficiently Identifying Task Groupings").

For tasks i, j with their own batches B_i, B_j and the parameters theta_s shared by all tasks:

    Z[i, j] = 1 - L_j(B_j; theta_s - lr * g_i) / L_j(B_j; theta_s),   g_i = grad_theta_s L_i^train(B_i)

Z[i, j] > 0: a step on task i lowers task j's loss (i helps j); < 0: it raises it (conflict). Rows
are the stepping task, columns the task that is affected. Because every task has its own dataset,
each task's loss is measured on its own batch. L_i^train is the loss a training step on task i
backpropagates (`raymtl.train.losses.training_loss`: the per-modality heads' losses beside the
fused head's, times the task weight), so the lookahead is that step. L_j is the fused head's
unweighted training criterion, label smoothing or the task's own loss included, which
train/<task>/loss_ewma tracks (a task weight would cancel in the ratio anyway). Z is a
relative change, so it needs losses >= 0: a negative loss is refused (`ConfigError`), and a target
whose loss is at most `FIT_LOSS` before the step counts as fit, Z[., j] = 0 (nothing left to change;
the ratio would be one of float32 rounding noise). The measurement is side-effect free: the lookahead
parameters live in a dict passed to `torch.func.functional_call`; the model and optimizer are never
written to, so it can run inside the training loop between two steps.

The paper's step is the optimizer's update for g_i, each parameter at its group's lr. With SGD that
is lr * g_i. With Adam it is the share of Adam's next update that g_i makes,
~ lr * (1 - b1) * g_i / (sqrt(v) + eps): a raw-gradient step at an Adam learning rate (~1e-3) moves
the weights far less than Adam does, and the measured Z is then noise. `optimizer_update` gives that
map for the optimizers raymtl builds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torch.nn import functional as F
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from raymtl.errors import ConfigError
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.collectives import all_reduce_sum, world_size
from raymtl.train.losses import LossFn, training_loss
from raymtl.tune.groupings import non_finite_pairs

Update = Callable[[str, Tensor], Tensor]  # (parameter name, gradient) -> step direction before lr
# A target loss at most this before the step is fit: its Z is 0. Cross-entropy near 0 is rounded in
# float32 at ~6e-8 (log of 1 + a small sum), so below ~1e-6 a loss ratio is mostly rounding.
FIT_LOSS = 1e-6
logger = logging.getLogger("raymtl")


def shared_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters outside the task heads: with one task group, what every task shares."""
    heads = {id(p) for p in model.parts()["heads"]}
    return [name for name, p in model.named_parameters() if id(p) not in heads]


def lookahead_affinity(
    model: nn.Module,
    batches: Mapping[str, Mapping[str, Tensor]],
    losses: Mapping[str, LossFn],
    lr: float,
    shared: Sequence[str] | None = None,
    update: Update | None = None,
    lookahead_rows: int | None = None,
    weights: Mapping[str, float] | None = None,
) -> tuple[list[str], Tensor]:
    """(tasks, Z [T, T]) for the tasks of `batches` (in its order); Z[i, j] as in the module doc.

    `losses[task](logits, batch["label"])` is the task's unweighted loss, `weights[task]` the weight
    training gives it (`TaskInfo.weight`; default 1); `shared` names the
    parameters that take the lookahead step (default: `shared_parameter_names`). Heads stay put.
    `update(name, g)` turns a gradient into the step direction (default: g itself, plain SGD).
    Pass the bare model, not its DDP wrapper: the measurement is local to one rank; it is left
    bit-identical.

    Scales with T: the source tasks step one at a time, each step written over its own gradient
    (peak memory about the shared parameters' bytes once, plus activations, whatever T is), and each
    step is evaluated on every target task's rows in one batched pass through the shared trunk
    (`_evaluate`). `lookahead_rows` caps the rows of that pass (all targets together; each target
    keeps its latest `lookahead_rows // T` rows, at least one): T forward+backward passes plus T
    bounded forward passes, linear in T. None: every target's full rows (T^2 rows-sized forwards).
    """
    tasks = list(batches)
    names = list(shared) if shared is not None else shared_parameter_names(model)
    all_params = dict(model.named_parameters())
    unknown = [n for n in names if n not in all_params]
    if unknown or not names:
        raise ValueError(f"shared parameters must be some of the model's parameter names; unknown: {unknown}")
    theta = {n: all_params[n].detach().requires_grad_(True) for n in names}
    keep = None if lookahead_rows is None else max(1, lookahead_rows // len(tasks))
    targets = {t: _latest(batches[t], keep) for t in tasks}
    subset = any(len(targets[t]["label"]) < len(batches[t]["label"]) for t in tasks)
    device = next(iter(theta.values())).device  # the losses' (a GPU's): Z is made there, no copy per step
    after = torch.zeros(len(tasks), len(tasks), dtype=torch.float64, device=device)
    before = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    with _deterministic(model):
        for i, source in enumerate(tasks):
            batch, weight = batches[source], 1.0 if weights is None else weights[source]
            outputs = _training_outputs(model, theta, batch, source)
            loss, fused = training_loss(outputs, batch["label"], losses[source], weight)
            grads = list(torch.autograd.grad(loss, list(theta.values()), allow_unused=True))
            before[i] = fused.detach().double()
            with torch.no_grad():
                moved = {}  # theta - lr * step, written over the gradient: no second copy of the parameters
                for n, g in zip(names, grads):
                    if g is None:
                        moved[n] = theta[n]
                        continue
                    step = update(n, g) if update else g
                    # Over the gradient when it owns its memory (not a broadcast view, say).
                    out = g if g.is_contiguous() and g._base is None else torch.empty_like(theta[n])
                    moved[n] = torch.mul(step, -lr, out=out).add_(theta[n])
                del grads
                after[i] = _evaluate(model, moved, targets, losses)
                del moved
        if subset:  # the targets' losses before any step, on the same rows as after it
            with torch.no_grad():
                before = _evaluate(model, theta, targets, losses)
    _check_not_negative(tasks, before, after)
    return tasks, torch.where(before <= FIT_LOSS, 0.0, 1.0 - after / before)


def optimizer_update(optimizer: torch.optim.Optimizer, model: nn.Module) -> Update:
    """The lookahead step direction of `optimizer` (see the module doc), at each parameter's group lr.

    The lookahead's lr is the first group's; another group's parameters step at their group's lr as a
    ratio to it (the text encoder's 0.1x, `raymtl.train.optim`), taken from the lrs the schedule scales
    (`initial_lr`: a warm-up's first step has lr 0 in every group, the ratio still holds).
    SGD (momentum or not): g. Adam/AdamW: the part of Adam's next update that g itself makes,
    (1 - b1) / (1 - b1^(t+1)) * g / (sqrt(v_hat) + eps), v_hat = (b2 * v + (1 - b2) * g^2) / (1 - b2^(t+1)),
    with v and t the parameter's state (zero before its first step). The rest of the update, the
    momentum, is the same whichever task steps, and weight decay too: they would only hide how the
    tasks differ.
    """
    adam = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
    by_param = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    params = {n: p for n, p in model.named_parameters() if id(p) in by_param}

    def lr_of(group: dict) -> float:
        return group.get("initial_lr", group["lr"])

    base_lr = lr_of(optimizer.param_groups[0])

    def update(name: str, grad: Tensor) -> Tensor:
        p = params.get(name)
        if p is None:  # not optimized (frozen): the optimizer would not move it
            return torch.zeros_like(grad)
        group = by_param[id(p)]
        ratio = lr_of(group) / base_lr
        if not adam:
            return grad * ratio
        state = optimizer.state.get(p, {})
        beta1, beta2 = group["betas"]
        t = float(state["step"]) if "step" in state else 0.0
        share = (1 - beta1) / (1 - beta1 ** (t + 1)) * ratio
        # One buffer per parameter, worked in place: the measurement's peak stays near one copy of
        # the shared parameters (a chain of temporaries held three of the largest layer at once).
        out = grad.square().mul_(1 - beta2)
        if "exp_avg_sq" in state:
            out.add_(state["exp_avg_sq"], alpha=beta2)
        out.div_(1 - beta2 ** (t + 1)).sqrt_().add_(group["eps"])
        return torch.div(grad, out, out=out).mul_(share)

    return update


class RecentRows:
    """Each task's latest training rows (its last few batches), `rows` of them, to measure Z on.

    A training batch alone (16 rows, say) makes Z mostly noise: one batch's loss moves by more
    under any step than the effect measured. Keeping the last ~64 rows per task costs nothing extra
    to read, only the measurement's forward passes grow.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.batches: dict[str, list[Mapping[str, Tensor]]] = {}

    def add(self, task: str, batch: Mapping[str, Tensor]) -> None:
        kept = [*self.batches.get(task, []), batch]
        while len(kept) > 1 and sum(len(b["label"]) for b in kept[1:]) >= self.rows:
            kept.pop(0)
        self.batches[task] = kept

    def has(self, tasks: Sequence[str]) -> bool:
        return all(t in self.batches for t in tasks)

    def get(self, task: str) -> dict[str, Tensor]:
        kept = self.batches[task]
        return {k: torch.cat([b[k] for b in kept])[-self.rows :] for k in kept[0]}


def _training_outputs(
    model: nn.Module, params: Mapping[str, Tensor], batch: Mapping[str, Tensor], task: str
) -> list[tuple[Tensor, float]]:
    """(logits, loss weight) of a training step on `batch` under `params`: a `MultiTaskModel`'s
    `training_outputs`, as the training loop takes them; another model's forward at weight 1."""
    if isinstance(model, MultiTaskModel):
        return _call(model, "training_outputs", params, batch, task)
    return [(_call(model, "forward", params, batch, task), 1.0)]


def _call(model: nn.Module, method: str, params: Mapping[str, Tensor], batch: Mapping, task: str) -> Any:
    """`model.<method>(batch, task)` under `params`, on fresh copies of the buffers: a BatchNorm in
    train mode updates its running statistics in place, which must land on throwaway tensors."""
    state = {f"model.{n}": t for n, t in {**{n: b.clone() for n, b in model.named_buffers()}, **params}.items()}
    return functional_call(_Method(model, method), state, args=(batch, task))


def _check_not_negative(tasks: Sequence[str], before: Tensor, after: Tensor) -> None:
    """Refuse a negative loss (before any step or after one), naming its task: Z would be meaningless."""
    if before.is_meta:  # no values to check
        return
    lowest = torch.cat([before[None], after]).amin(0)
    if bool((lowest < 0).any()):
        j = int(lowest.argmin())
        raise ConfigError(
            f"task {tasks[j]!r}: its loss is negative ({float(lowest[j]):.4g}); the task affinity "
            "(training.affinity_every_steps) compares losses by their ratio and needs every task's loss "
            "to be >= 0: shift a loss with another lower bound to 0"
        )


def _latest(batch: Mapping[str, Tensor], rows: int | None) -> Mapping[str, Tensor]:
    if rows is None or len(batch["label"]) <= rows:
        return batch
    return {k: v[-rows:] for k, v in batch.items()}


def _evaluate(
    model: nn.Module, params: Mapping[str, Tensor], batches: Mapping[str, Mapping[str, Tensor]], losses: Mapping[str, LossFn]
) -> Tensor:
    """Each task's loss [T] (float64, the order of `batches`) under `params`, without gradients.

    A `MultiTaskModel` runs the tasks whose features come from the same modules and whose inputs
    have the same shapes as one batch through the trunk (`features`), then each task's head on its
    rows. BatchNorms that normalise by batch statistics do so per task (`_per_task_batch_norm`), so
    the result equals one pass per task. Other models: one pass per task.
    """
    if not isinstance(model, MultiTaskModel):
        return torch.stack([losses[t](_call(model, "forward", params, b, t), b["label"]).double()
                            for t, b in batches.items()])
    together: dict[tuple, list[str]] = {}
    for task, batch in batches.items():
        shapes = tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in batch.items() if k != "label"))
        together.setdefault((model.feature_key(task), shapes), []).append(task)
    out = dict.fromkeys(batches, None)
    for tasks in together.values():
        sizes = [len(batches[t]["label"]) for t in tasks]
        joined = {k: torch.cat([batches[t][k] for t in tasks]) for k in batches[tasks[0]] if k != "label"}
        with _per_task_batch_norm(model, sizes):
            feats = _call(model, "features", params, joined, tasks[0])
        for task, f in zip(tasks, feats.split(sizes)):
            prefix = f"heads.{task}."
            head = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
            out[task] = losses[task](functional_call(model.heads[task], head, args=(f,)), batches[task]["label"]).double()
    return torch.stack(list(out.values()))


class _Method(nn.Module):
    """`model.<method>(batch, task)` as a module's forward, for `functional_call` (names prefixed `model.`)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, batch: Mapping[str, Tensor], task: str) -> Any:
        return getattr(self.model, self.method)(batch, task)


@contextlib.contextmanager
def _per_task_batch_norm(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """BatchNorms that use batch statistics normalise each task's rows by that task's statistics.

    The image trunk sees every view of the joined batch stacked view-major (`ImageBackbone.forward`):
    view 0's rows of each task in turn, then view 1's, ...; a task's statistics span all its views, as
    in a pass of that task alone. Running statistics are not updated (the measurement leaves buffers
    alone); BatchNorms on running statistics (eval mode) act row by row and stay as they are.
    """
    patched = [m for m in model.modules() if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]

    def forward(m: _BatchNorm, x: Tensor) -> Tensor:
        views, extra = divmod(x.shape[0], sum(sizes))
        if extra:
            raise RuntimeError(f"a BatchNorm saw {x.shape[0]} rows, not a multiple of the tasks' {sum(sizes)}")
        if len(set(sizes)) > 1:
            parts, n = x.split(list(sizes) * views), len(sizes)  # part k: view k // n of task k % n
            normed = [F.batch_norm(torch.cat(parts[t::n]), None, None, m.weight, m.bias, True, 0.0, m.eps).split(size)
                      for t, size in enumerate(sizes)]
            return torch.cat([normed[k % n][k // n] for k in range(len(parts))])
        rows = x.reshape(views, len(sizes), sizes[0], x.shape[1], -1)  # [view, task, row, channel, rest]: one call
        var, mean = torch.var_mean(rows, dim=(0, 2, 4), unbiased=False, keepdim=True)
        y = (rows - mean) * torch.rsqrt(var + m.eps)
        if m.weight is not None:
            y = y * m.weight.view(1, 1, 1, -1, 1) + m.bias.view(1, 1, 1, -1, 1)
        return y.reshape(x.shape)

    try:
        for m in patched:
            m.forward = functools.partial(forward, m)
        yield
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def _deterministic(model: nn.Module) -> Iterator[None]:
    """Switch off dropout (modules and attention) but keep BatchNorm in the model's current mode.

    Dropout noise would swamp the small loss differences Z is made of and differ between the
    "before" and "after" passes. BatchNorm is deterministic; keeping it in train mode measures the
    function the optimizer actually trains (batch statistics), whereas early in training the
    running statistics describe a different, poorly estimated network. So every module without a
    BatchNorm inside it goes to eval; BatchNorms and their containers keep their mode.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            if not any(isinstance(sub, _BatchNorm) for sub in m.modules()):
                m.training = False
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class AffinityTracker:
    """Running mean of lookahead affinities over a run (TAG averages Z over training).

    A measurement with a non-finite value (a NaN or infinite loss) is skipped, counted in `skipped`
    and logged naming its tasks: in the running total it would make the mean NaN for the rest of the run.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.total = torch.zeros(len(self.tasks), len(self.tasks), dtype=torch.float64)
        self.count = 0
        self.skipped = 0

    def update(self, z: Tensor) -> None:
        if z.shape != self.total.shape:
            raise ValueError(f"affinity of shape {tuple(z.shape)} for {len(self.tasks)} tasks")
        z = z.detach().to("cpu", torch.float64)
        bad = non_finite_pairs(z, self.tasks)
        if bad:
            self.skipped += 1
            logger.warning("[raymtl] affinity measurement skipped (%d so far): Z is not finite for %s "
                           "(stepping task -> affected task; a NaN or infinite loss)", self.skipped, bad)
            return
        self.total += z
        self.count += 1

    def mean(self) -> Tensor:
        if not self.count:
            raise ValueError("no affinity measured yet: call update() first")
        return self.total / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "total": self.total.clone(), "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"affinity state is for tasks {state['tasks']}, this tracker for {self.tasks}")
        self.total = state["total"].clone().to(torch.float64)
        self.count = int(state["count"])
        self.skipped = int(state.get("skipped", 0))  # checkpoints before it counted none

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the mean as a matrix and as {source task: {target task: affinity}}; None and {}
        when every measurement was skipped."""
        mean = self.mean().tolist() if self.count else None
        return {
            "tasks": list(self.tasks),
            "count": self.count,
            "skipped": self.skipped,
            "mean": mean,
            "affinity": {i: dict(zip(self.tasks, row)) for i, row in zip(self.tasks, mean or [])},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


# ------------------------------------------------------------ heatmap

CELL = 56  # pixels per matrix cell: room for "-0.123"
PAD = 12


def plot_heatmap(z: Tensor, tasks: Sequence[str], path: str | Path, title: str = "task affinity") -> Path:
    """A PNG of Z: rows the stepping task, columns the affected task, values printed in the cells.

    Diverging colours centred at 0 (blue helps, red hurts), scaled by the largest |Z| off the
    diagonal so self-affinity does not wash out the inter-task values. Pillow only.
    """
    values = z.detach().to("cpu", torch.float64)
    n = len(tasks)
    if values.shape != (n, n):
        raise ValueError(f"affinity of shape {tuple(values.shape)} for {n} tasks")
    font = ImageFont.load_default(13)
    label_w = max(_text_size(font, t)[0] for t in tasks)
    text_h = _text_size(font, "Ag")[1]
    header = [title, "row: stepping task, column: affected task"]
    left, top = label_w + 2 * PAD, label_w + 2 * text_h + 3 * PAD
    width = max(left + n * CELL, max(_text_size(font, line)[0] for line in header) + PAD) + PAD
    image = Image.new("RGB", (width, top + n * CELL + PAD), "white")
    draw = ImageDraw.Draw(image)
    for k, (line, ink) in enumerate(zip(header, ("black", "dimgray"))):
        draw.text((PAD, PAD + k * (text_h + 4)), line, fill=ink, font=font)
    off_diag = values[~torch.eye(n, dtype=torch.bool)]
    scale = float(off_diag.abs().max()) if n > 1 else float(values.abs().max())
    for k, task in enumerate(tasks):
        w, _ = _text_size(font, task)
        draw.text((left - w - 6, top + k * CELL + (CELL - text_h) // 2), task, fill="black", font=font)
        _vertical_text(image, (left + k * CELL + (CELL - text_h) // 2, top - w - 6), task, font, "black")
    for i in range(n):
        for j in range(n):
            v = float(values[i, j])
            box = (left + j * CELL, top + i * CELL, left + (j + 1) * CELL - 1, top + (i + 1) * CELL - 1)
            colour = _diverging(v / scale if scale > 0 else 0.0)
            draw.rectangle(box, fill=colour, outline="white")
            label = f"{v:.3f}"
            w, h = _text_size(font, label)
            ink = "white" if sum(colour) < 380 else "black"
            draw.text((box[0] + (CELL - w) // 2, box[1] + (CELL - h) // 2), label, fill=ink, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _text_size(font: ImageFont.ImageFont, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = font.getbbox(text)
    return int(x1), int(y1)


def _vertical_text(
    image: Image.Image, xy: tuple[int, int], text: str, font: ImageFont.ImageFont, fill: str
) -> None:
    """Text running bottom-to-top (column labels), its top-left corner at `xy`."""
    w, h = _text_size(font, text)
    strip = Image.new("L", (w, h), 0)
    ImageDraw.Draw(strip).text((0, 0), text, fill=255, font=font)
    strip = strip.rotate(90, expand=True)
    image.paste(Image.new("RGB", strip.size, fill), xy, mask=strip)


def _diverging(x: float) -> tuple[int, int, int]:
    """x in [-1, 1] -> red (-1) .. white (0) .. blue (+1)."""
    x = max(-1.0, min(1.0, x))
    far = (33, 102, 172) if x >= 0 else (178, 24, 43)
    return tuple(round(255 + (c - 255) * abs(x)) for c in far)  # type: ignore[return-value]


# ---------------------------------------------------------------- in the training loop (all ranks)


def measure_affinity(
    model, recent: RecentRows, losses, weights, optimizer, tracker: AffinityTracker, lookahead_rows: int | None = None
) -> None:
    """One lookahead affinity measurement on each task's latest rows, averaged over ranks.

    The lookahead step is the optimizer's own update for the gradient of each task's training loss
    (`weights`: the tasks' loss weights) at its current lr.
    Autocast stays off: Z is made of loss ratios 1 - after/before whose differences are small, and
    bf16's 8-bit mantissa would drown them, so the measurement runs in float32 even when training
    uses bf16. Z is reduced in float64 on the process group's device.
    """
    lr = optimizer.param_groups[0]["lr"]
    update = optimizer_update(optimizer, model)
    device = next(model.parameters()).device
    with torch.autocast(device.type, enabled=False):
        tasks, z = lookahead_affinity(
            model, {t: recent.get(t) for t in tracker.tasks}, losses, lr, update=update, lookahead_rows=lookahead_rows,
            weights=weights,
        )
    tracker.update(all_reduce_sum(z.double()) / world_size())


def affinity_ready(recent: RecentRows, tracker: AffinityTracker) -> bool:
    """Whether every rank holds rows of every task (all ranks then measure together, or none does)."""
    have = torch.tensor([float(recent.has(tracker.tasks))])
    return all_reduce_sum(have).item() == world_size()
