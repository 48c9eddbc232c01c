"""`train_loop_per_worker`: the random-batch multi-task loop, run by every Ray Train worker.

Each step trains one task: every rank derives the same `TaskSchedule` from (seed, epoch), takes
the next batch of that task from its own shard of the task's dataset, and back-propagates only that
task's (weighted) loss. `GradSync` averages over ranks, overlapped with that backward, the
gradients of exactly the parameters that task used; the other tasks' heads and the other groups'
backbones keep `grad=None`, so the optimizer does not move them and no bytes are spent on them.
Parameters start identical on every rank (broadcast from rank 0); BatchNorm running statistics are
rank 0's, broadcast before every evaluation and checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from raymtl.config import Experiment, StageSpec, global_batch
from raymtl.data.datasets import DecodedCache, TaskInputs, decode_slots, warm_decoders
from raymtl.data.device_inputs import DeviceInputs
from raymtl.data.plan import GlobalStep, epoch_plan, rank_rows, rank_steps, val_steps
from raymtl.data.schedule import TaskSchedule
from raymtl.data.task_info import TaskInfo
from raymtl.models.artifact import load as load_artifact
from raymtl.models.artifact import save_model
from raymtl.models.build import build_model
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.affinity import AffinityTracker, RecentRows, affinity_ready, measure_affinity
from raymtl.train.batches import TaskBatches
from raymtl.train.checkpoint import (
    Position,
    RunMeta,
    checkpoint_score,
    load_train_state,
    report_checkpoint,
    resume_position,
    save_train_state,
)
from raymtl.train import elastic
from raymtl.train.collectives import broadcast_tensors, gather_rng
from raymtl.train.evaluation import evaluate, sync_buffers
from raymtl.train.faults import maybe_crash
from raymtl.train.gradsync import GradSync
from raymtl.train.losses import task_loss, training_loss
from raymtl.train.metrics import Ewma
from raymtl.train.optim import build_lr_schedule, build_optimizer, stage_step
from raymtl.train.precision import Precision, configure_kernels
from raymtl.train.report import RunFiles, epoch_row
from raymtl.train.timing import StepTimer

logger = logging.getLogger("raymtl")


def stages_of(exp: Experiment) -> list[StageSpec]:
    """The configured stages, or one stage of `training.epochs` with nothing frozen."""
    return exp.training.stages or [StageSpec(epochs=exp.training.epochs)]


def stage_at(stages: list[StageSpec], epoch: int) -> int:
    end = 0
    for i, s in enumerate(stages):
        end += s.epochs
        if epoch < end:
            return i
    return len(stages) - 1


def _device(use_gpu: bool) -> torch.device:
    """A run in the driver's process: the current GPU when asked for one (Ray Train's local mode
    would take any GPU it sees), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def resume_checkpoint(found: str | None) -> ray.train.Checkpoint | None:
    """Where to resume: Ray Train's latest checkpoint (a restarted worker group) or `found`, the
    run folder's newest when the driver started (a rerun, or a run with no Train controller), whichever is newer."""
    ours = ray.train.get_checkpoint()
    if found is None or (ours is not None and Path(ours.path).name >= Path(found).name):
        return ours
    return ray.train.Checkpoint(found)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    exp: Experiment = config["experiment"]
    infos: dict[str, TaskInfo] = config["infos"]
    run_dir: str = config["run_dir"]
    inputs: TaskInputs = config["inputs"]
    tr = exp.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP_NUM_THREADS to the worker's CPUs only when the environment has none, so an
    # inherited value (1 in many containers) would win; the CPU step computes with these threads.
    torch.set_num_threads(max(1, int(tr.cpus_per_worker)))
    in_process = config.get("in_process", False)
    device = _device(tr.use_gpu) if in_process else ray.train.torch.get_device()
    configure_kernels(device, tr.deterministic)
    precision = Precision.on(device, tr.precision, tr.mixed_precision)
    slots = decode_slots(world, tr.cpus_per_worker) if inputs.cached is None else 0
    if slots:
        warm_decoders(inputs, slots)  # their start-up overlaps the model's

    resume = resume_checkpoint(config.get("resume_from"))
    if resume is not None:
        with resume.as_directory() as folder:
            model = load_artifact(folder).model
            state = load_train_state(Path(folder))
    else:
        model = build_model(exp, infos)
        state = None
    model.to(device).train()
    broadcast_tensors([*model.parameters(), *model.buffers()])  # ranks built their weights from unseeded RNGs
    if tr.compile:
        model.compile_features()
    torch.manual_seed(exp.seed * 1000 + rank)
    np.random.seed((exp.seed * 1000 + rank) % 2**32)

    losses = {t.name: task_loss(t, infos[t.name]) for t in exp.tasks}
    task_weights = {name: info.weight for name, info in infos.items()}  # the affinity lookahead steps as training does
    ewma = {name: Ewma(tr.ewma_alpha) for name in infos}
    position = Position()
    affinity = AffinityTracker(sorted(infos)) if tr.affinity_every_steps else None
    recent = RecentRows(tr.affinity_rows)
    stages = stages_of(exp)
    size = global_batch(tr, world)  # rows of one step, all ranks together
    batches = {name: info.n_train // size for name, info in infos.items()}
    n_train = {name: info.n_train for name, info in infos.items()}
    n_val = {name: info.n_val for name, info in infos.items() if info.n_val}
    cache = DecodedCache(inputs.cached) if inputs.cached is not None else None
    device_inputs = DeviceInputs(exp.data, device)

    def epoch_data(epoch: int, worlds: list[list[int]], start: int) -> tuple[list[GlobalStep], list, TaskBatches]:
        """`epoch`'s global plan (for the world it started on, re-cut at each resize in `worlds`), this
        rank's steps of it from step `start`, and their batches, preparing from now on."""
        first = worlds[0][1]
        steps = TaskSchedule({name: n // first for name, n in n_train.items()}, exp.seed, epoch, tr.sampler,
                             tr.temperature).steps()
        all_steps = epoch_plan(steps, n_train, worlds)
        plan = rank_steps(all_steps[start:], n_train, seed=exp.seed, epoch=epoch, rank=rank, world=world,
                          shuffle=exp.data.shuffle)
        return all_steps, plan, TaskBatches(inputs, "train", plan, device_inputs, cache, slots=slots,
                                            planned=rank_rows(all_steps, rank, world))  # a resumed epoch's too

    upcoming: dict[int, tuple] = {}  # the next epoch's plan and batches, prepared while this one evaluates
    meta = RunMeta.of(exp, infos, batches, world)
    ranked_by = checkpoint_score(exp, infos)
    grad_sync = GradSync(model, compression=tr.grad_compression)
    files = RunFiles(run_dir, config.get("retention")) if rank == 0 else None

    if state is not None:
        old_world = state["meta"].schedule["world_size"] if state["meta"] else world
        position = resume_position(state["meta"], meta, state["position"], rank)
        if old_world != world:
            position.resizes += 1
        else:
            position.recoveries += 1
        elastic.record(position, elastic.resumed_event(position, old_world, world), files)
        elastic.log_resume(position.global_step)
        for name, s in state["ewma"].items():
            ewma[name].load_state_dict(s)
        elastic.restore_rng(state["rng"], seed=exp.seed, epoch=position.epoch, rank=rank, world=world)
        if affinity is not None and state.get("affinity"):
            affinity.load_state_dict(state["affinity"])

    scaler = precision.scaler(state.get("scaler") if state is not None else None)  # fp16 only
    total_epochs = sum(s.epochs for s in stages)
    stage_idx = None
    preempting = False  # a preemption notice was seen (and checkpointed) by this worker group
    watch = bool(config.get("watch_preemption")) and not in_process
    while position.epoch < total_epochs:
        epoch = position.epoch
        if stage_at(stages, epoch) != stage_idx:
            stage_idx = stage_at(stages, epoch)
            stage = stages[stage_idx]
            resumed = state is not None and state["stage"] == stage_idx
            optimizer, lr_schedule = _start_stage(model, exp, stage, n_train, size, state if resumed else None)
            if resumed:
                optimizer.load_state_dict(state["optimizer"])
                change = lr_schedule.load_state_dict(state["lr_schedule"])
                if change and rank == 0:
                    logger.warning("[raymtl] %s", change)
            state = None

        if not position.worlds:  # the epoch's plan: for the world it starts on, re-cut at each resize
            position.worlds = [[world, size, 0]]
        if position.step == 0 and epoch in upcoming:
            all_steps, plan, data = upcoming.pop(epoch)
        else:
            all_steps, plan, data = epoch_data(epoch, position.worlds, position.step)
        timer = StepTimer(device)
        timer.streams_started()
        for planned, mine in zip(all_steps[position.step :], plan):
            task, at = planned.task, position.samples
            timer.begin()
            batch = data.next(task)
            timer.fetched()
            position.step += 1
            position.samples += planned.size
            position.consumed[task] = position.consumed.get(task, 0) + planned.size
            optimizer.zero_grad(set_to_none=True)
            grad_sync.start(task, had_batch=batch is not None)  # buckets go out while backward runs
            if batch is not None:  # None: this rank's shard ran short; it still joins the gradient sync
                with precision.autocast():
                    outputs = model.training_outputs(batch, task)
                loss, fused = training_loss(outputs, batch["label"], losses[task], infos[task].weight)
                (loss if scaler is None else scaler.scale(loss)).backward()
                ewma[task].update(fused)  # the fused head's criterion, unweighted (val/loss: its plain NLL)
            if not grad_sync.finish():
                continue  # no rank had a batch: every rank skips the step
            lr = optimizer.param_groups[0]["lr"]
            _step(model, optimizer, scaler, tr.grad_clip)
            lr_schedule.after_step(planned.size)
            timer.done(task, len(batch["label"]) if batch is not None else 0)
            position.global_step += 1
            if affinity is not None:
                if batch is not None:
                    recent.add(task, batch)
                if position.global_step % tr.affinity_every_steps == 0 and affinity_ready(recent, affinity):
                    measure_affinity(model, recent, losses, task_weights, optimizer, affinity,
                                     tr.affinity_lookahead_rows)
            if files is not None:
                files.log_step(epoch, position.step, len(all_steps), task, ewma[task])
            elastic.log_rows(epoch, position, at, rank, world, task, mine.rows, lr)
            maybe_crash(run_dir, position.global_step, rank, in_process)
            periodic = tr.checkpoint_every_steps and position.global_step % tr.checkpoint_every_steps == 0
            notice = watch and elastic.preemption_notice(tr.preemption_check_steps, position.global_step, preempting)
            if notice != preempting:  # checkpoint now, even at the epoch's last step (its end evaluates first)
                elastic.noticed(position, world, files)
            if periodic and position.step < len(all_steps) or notice != preempting:
                _report(exp, model, optimizer, scaler, lr_schedule, ewma, affinity, position, stage_idx, meta, {}, files,
                        ranked_by, background=notice == preempting)
            preempting = notice

        if files is not None and affinity is not None and (affinity.count or affinity.skipped):
            files.log_affinity(affinity)
        # Validation decodes from here, not during the training steps; the next epoch's first
        # batches are prepared while this one evaluates and checkpoints.
        val_data = TaskBatches(inputs, "val", val_steps(n_val, tr.eval_batch_size, rank=rank, world=world),
                               device_inputs, cache, slots=slots)
        if epoch + 1 < total_epochs:
            upcoming = {epoch + 1: epoch_data(epoch + 1, [[world, size, 0]], 0)}
        timer.eval_started()
        val = evaluate(model, exp, infos, val_data, device, precision)
        row = epoch_row(epoch, position.global_step, val, ewma, optimizer.param_groups[0]["lr"])
        row.update(timer.metrics(world))
        row["samples"] = position.samples
        lr_schedule.after_epoch(row.get("val/mean_loss"))
        position = dataclasses.replace(position, epoch=epoch + 1, step=0, history=[*position.history, row], worlds=[],
                                       consumed={})
        _report(exp, model, optimizer, scaler, lr_schedule, ewma, affinity, position, stage_idx, meta, row, files,
                ranked_by)


def _step(model: MultiTaskModel, optimizer: torch.optim.Optimizer, scaler, grad_clip: float | None) -> None:
    """The optimizer step on the synchronised gradients; with fp16's scaler, unscaled first (the
    clip sees true norms) and skipped, the scale lowered, when a gradient overflowed."""
    if grad_clip:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


def _start_stage(model: MultiTaskModel, exp: Experiment, stage: StageSpec, n_train: dict[str, int], size: int,
                 saved: dict | None = None):
    """Freeze this stage's parts and build its optimizer (in the layout of `saved`'s, the train state
    of a resumed stage) and LR schedule: in global samples, over the stage's epochs of the current
    config and rows, in steps of `size` (this world's global batch) or, resumed, of the size the
    stage started on, so a resize keeps the schedule and a longer config lengthens it."""
    model.freeze(stage.freeze)
    lr = stage.lr if stage.lr is not None else exp.training.lr
    optimizer = build_optimizer(model, exp.training, lr, saved=saved["optimizer"] if saved else None)
    step = (stage_step(saved["lr_schedule"]) if saved else None) or size
    total_steps = stage.epochs * sum(n // step for n in n_train.values())
    lr_schedule = build_lr_schedule(optimizer, exp.training, total_steps=total_steps, step_samples=step)
    return optimizer, lr_schedule


def _unmeasured_metrics(exp: Experiment, position: Position, ranked_by: str | None) -> dict:
    """A mid-epoch checkpoint's metrics: its weights were never evaluated, so it scores worst by the
    metric checkpoints are ranked by (`ranked_by`; None: by recency, no validation data) and ranks
    below every epoch's checkpoint (were it to carry the last epoch's score, the tie would keep it,
    the newer, and delete the checkpoint that score was measured on).

    Worst is the largest finite float: Ray Train keeps scores in a JSON snapshot where infinity does
    not survive (a resumed run would then fail to rank).
    """
    if ranked_by is None:
        return {"epoch": position.epoch}
    worst = sys.float_info.max if exp.training.checkpoint_mode == "min" else -sys.float_info.max
    return {ranked_by: worst, "epoch": position.epoch}


def _report(exp, model, optimizer, scaler, lr_schedule, ewma, affinity, position, stage_idx, meta, row, files,
            ranked_by: str | None, background: bool = True) -> None:
    """Every rank reports (Ray Train requires it); rank 0 writes the checkpoint folder (`background`:
    see `checkpoint.report_checkpoint`)."""
    sync_buffers(model)
    rng_states = gather_rng()
    metrics = {**(row or _unmeasured_metrics(exp, position, ranked_by)), "global_step": position.global_step}
    if files is None:
        ray.train.report(metrics, checkpoint=None)
        return
    if row:
        files.log_epoch(row, position.history, position.events)

    def write(folder: Path) -> None:
        save_model(folder, model, data=exp.data, experiment=exp.to_dict())
        save_train_state(
            folder,
            position=position,
            stage=stage_idx,
            optimizer=optimizer,
            scaler=scaler.state_dict() if scaler is not None else None,
            lr_schedule_state=lr_schedule.state_dict(),
            ewma={k: v.state_dict() for k, v in ewma.items()},
            affinity=affinity.state_dict() if affinity is not None else None,
            rng_states=rng_states,
            meta=meta,
        )

    report_checkpoint(files.run_dir, write, metrics, files.retention, background)
