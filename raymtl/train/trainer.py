"""Driver side of training: check everything, then hand the task inputs (tables in the object store,
a decoded cache, or a large source's blocks) to a TorchTrainer, or train here (`in_process`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from raymtl import console, preflight, storage
from raymtl.config import ConfigError, Experiment, global_batch, worker_range
from raymtl.data.schedule import TaskSchedule
from raymtl.data.task_info import TaskInfo
from raymtl.models.hub import resolve_models
from raymtl.ray_runtime import PREEMPTION_WATCHER_ENV, ensure_ray
from raymtl.train.checkpoint import RunMeta, best_of, checkpoint_score, latest_run_meta, newest_checkpoint
from raymtl.train.elastic import ROWS_ENV
from raymtl.train.faults import CRASH_ENV
from raymtl.train.precision import kernel_env
from raymtl.train.report import format_history, read_history, read_rows


@dataclass
class TrainResult:
    run_dir: str  # storage_path/name: Ray Train's run folder plus metrics.jsonl and tensorboard/
    checkpoint: str | None  # latest checkpoint folder (a loadable model)
    best_checkpoint: str | None  # best by training.checkpoint_metric
    metrics: dict[str, Any]  # the last reported metrics
    history: list[dict[str, Any]]  # one row per epoch
    error: Exception | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # a row per resize and recovery (elastic.resumed_event)


def check_schedule(exp: Experiment, infos: dict[str, TaskInfo]) -> dict[str, int]:
    """Per-task steps per epoch (on the most workers the run may have); fails before Ray starts when
    a task cannot fill one step."""
    size = global_batch(exp.training, worker_range(exp.training)[1])
    batches = {name: info.n_train // size for name, info in infos.items()}
    TaskSchedule(batches, exp.seed, 0, exp.training.sampler, exp.training.temperature)
    return batches


def check_resume(exp: Experiment, infos: dict[str, TaskInfo], batches: dict[str, int]) -> None:
    """Refuse to resume a run (same storage path and name) whose latest checkpoint holds another model.

    Changed tasks, label maps, groups or architecture would load weights under the wrong class ids
    or fail inside Ray; a changed worker count or schedule is fine (see `checkpoint.resume_position`).
    """
    found = latest_run_meta(storage.join(storage.normalize(exp.storage_path), exp.name))
    if found is None:
        return
    folder, saved = found
    change = RunMeta.of(exp, infos, batches, worker_range(exp.training)[1]).model_change(saved)
    if change:
        raise ConfigError(
            f"cannot resume run {exp.name!r} from {folder}: {change}; "
            "train under a new name (model.base grows a trained model by new tasks)"
        )


def with_base_labels(exp: Experiment) -> Experiment:
    """Tasks that the base model already has keep its label maps (same class ids, same head)."""
    if not exp.model.base:
        return exp
    from raymtl.models.build import base_label_maps

    known = base_label_maps(exp.model.base)
    tasks = []
    for t in exp.tasks:
        if t.name in known and t.labels is not None and list(map(str, t.labels)) != known[t.name]:
            raise ConfigError(f"task {t.name!r}: labels {t.labels} differ from the base model's {known[t.name]}")
        tasks.append(dataclasses.replace(t, labels=known[t.name]) if t.name in known else t)
    return dataclasses.replace(exp, tasks=tasks)


def prepare(exp: Experiment) -> tuple[Experiment, dict[str, TaskInfo]]:
    """Everything checked before Ray starts: the experiment (with the base's label maps and its named
    models resolved to local files, fetched once here) and its tasks.

    Names as torch keys, models, `preflight.check` (files, columns, labels, the metric, storage, a sample
    of images), that every task fills a batch, that `model.base` / `init_from` load, and that a run
    resumed under the same name still has the model of its latest checkpoint.
    """
    from raymtl.models.multitask import check_module_names  # transformers, torchvision: not at import

    check_module_names(exp.task_names, list(exp.task_groups()))
    exp = with_base_labels(resolve_models(exp))
    infos = preflight.check(exp)
    check_resume(exp, infos, check_schedule(exp, infos))
    if exp.model.base or exp.model.init_from:
        from raymtl.models.build import build_model

        build_model(exp, infos)
    return exp, infos


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point, pickled by reference: the loop and its models (torchvision,
    transformers) are imported here, in the worker, so the driver never pays for them."""
    from raymtl.train.loop import train_loop_per_worker as loop

    loop(config)


def for_workers(exp: Experiment) -> Experiment:
    """The experiment without its source tables: workers read Ray Datasets, not the sources."""
    return dataclasses.replace(exp, tasks=[dataclasses.replace(t, train=None, validation=None) for t in exp.tasks])


def task_inputs(exp: Experiment, infos: dict[str, TaskInfo], nbytes: int):
    """The tasks' inputs for the loop (`datasets.build_inputs`), decoded now with `data.cache`
    (decided by the object store of the cluster running here, or that Ray would start).
    `nbytes`: `datasets.decoded_nbytes`."""
    from raymtl.data.datasets import build_inputs, should_cache

    cache = should_cache(exp, nbytes)
    if cache:
        console.say(f"[raymtl] decoding the inputs of {len(infos)} tasks once (~{nbytes / 2**20:.0f} MB), "
                    "kept for every epoch (data.cache)")
    return build_inputs(exp, infos, cache=cache)


def loop_config(exp: Experiment, infos: dict[str, TaskInfo], inputs, **extra) -> dict[str, Any]:
    """`train_loop_per_worker`'s config; `resume_from`: the run folder's newest checkpoint, if any."""
    run_dir = storage.join(storage.normalize(exp.storage_path), exp.name)
    return {"experiment": for_workers(exp), "infos": infos, "run_dir": run_dir, "inputs": inputs,
            "resume_from": newest_checkpoint(run_dir), "watch_preemption": watches_preemption(), **extra}


def watches_preemption() -> bool:
    """Whether Ray Train's preemption watcher runs (off on the lean local cluster `ensure_ray`
    starts): decided here once, as asking it is a barrier every rank must take alike."""
    return os.environ.get(PREEMPTION_WATCHER_ENV, "1") != "0"


def make_trainer(exp: Experiment, infos: dict[str, TaskInfo], run_config_overrides: dict | None = None,
                 inputs=None):
    """A TorchTrainer for `exp` on Ray Train's workers: task tables in the object store (decoded
    now with `data.cache`), or `inputs` built before (a sweep's, shared by its trials)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig

    from raymtl.train.failures import Trainer

    tr = exp.training
    env = {**kernel_env(tr.deterministic), **forwarded_env()}
    run_config = RunConfig(
        name=exp.name,
        storage_path=storage.normalize(exp.storage_path),
        failure_config=FailureConfig(max_failures=tr.max_failures, max_preemption_failures=tr.max_preemptions,
                                     preemption_grace_s=tr.preemption_grace_s),
        worker_runtime_env={"env_vars": env} if env else None,
        checkpoint_config=CheckpointConfig(
            num_to_keep=tr.keep_checkpoints,
            checkpoint_score_attribute=checkpoint_score(exp, infos),
            checkpoint_score_order=tr.checkpoint_mode,
        ),
        **(run_config_overrides or {}),
    )
    from raymtl.data.datasets import decoded_nbytes

    if inputs is None:
        inputs = task_inputs(exp, infos, decoded_nbytes(exp, infos))
    return Trainer(  # TorchTrainer; a data error spends no `max_failures` retry
        train_loop_per_worker,
        train_loop_config=loop_config(exp, infos, inputs),
        scaling_config=scaling_config(tr),
        torch_config=TorchConfig(backend="nccl" if tr.use_gpu else "gloo", timeout_s=tr.collective_timeout_s),
        run_config=run_config,
    )


def scaling_config(tr):
    """Ray Train's workers: a fixed number, or elastic between `num_workers: [min, max]` (Ray
    Train restarts the group from the latest checkpoint at each resize; the loop continues exactly)."""
    from ray.train import ScalingConfig

    lo, hi = worker_range(tr)
    return ScalingConfig(num_workers=lo if lo == hi else (lo, hi), elastic_resize_monitor_interval_s=tr.elastic_resize_interval_s,
                         use_gpu=tr.use_gpu, resources_per_worker={"CPU": tr.cpus_per_worker, **tr.worker_resources})


def fit_here(exp: Experiment, infos: dict[str, TaskInfo], inputs=None) -> tuple[Any, str | None]:
    """Train in this process (`in_process`): Ray only for data that needs it, released once a
    cache it decoded is fetched (only a cluster started for this run: a sweep's stays up).
    `inputs`: built before (a sweep's, shared by its trials). Returns Ray Train's `Result` and the best checkpoint."""
    from raymtl import ray_runtime
    from raymtl.data.datasets import decoded_nbytes, needs_ray, should_cache
    from raymtl.train.in_process import Retention, fit_in_process

    if exp.training.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("training.use_gpu: this process sees no CUDA device to train on "
                              "(check CUDA_VISIBLE_DEVICES and the NVIDIA driver)")
    if inputs is None:
        nbytes = decoded_nbytes(exp, infos)
        was_up = ray_runtime.started_here()  # a cluster this command runs on already (a sweep's) stays up
        if needs_ray(should_cache(exp, nbytes), sum(i.n_train + i.n_val for i in infos.values())):
            ensure_ray()
        inputs = task_inputs(exp, infos, nbytes)
        if inputs.cached is not None and ray_runtime.started_here() and not was_up:
            inputs = inputs.in_process()  # the decoded cache, fetched: the loop needs no cluster
            ray_runtime.release()
    tr = exp.training
    retention = Retention(tr.keep_checkpoints, checkpoint_score(exp, infos), tr.checkpoint_mode)
    config = loop_config(exp, infos, inputs, in_process=True, retention=retention)
    result = fit_in_process(exp, config, retention)
    return result, retention.best(config["run_dir"])


def forwarded_env() -> dict[str, str]:
    """Tests' hooks (`faults.CRASH_ENV`, `elastic.ROWS_ENV`) when set here: Ray's processes, started
    before the test set them, get them only through a runtime env."""
    return {name: os.environ[name] for name in (CRASH_ENV, ROWS_ENV) if os.environ.get(name)}


def fit(exp: Experiment, *, address: str | None = None, raise_on_error: bool = True, here: bool | None = None
        ) -> TrainResult:
    """Train `exp` on Ray; re-running the same experiment name resumes from its latest checkpoint.

    One worker on a local machine trains in this process (`training.in_process`, see
    `raymtl.train.in_process`); otherwise on Ray Train's workers. `here=True`: in this process
    whatever cluster it joined (a sweep's one-worker trial, in its actor). With
    `raise_on_error=False` a failed run returns its error (and what it saved) instead.
    """
    from ray.train import TrainingFailedError

    from raymtl.train.in_process import trains_in_process

    exp, infos = prepare(exp)
    here = trains_in_process(exp, address) if here is None else here
    if not here:
        ensure_ray(address)
    run_dir = storage.join(storage.normalize(exp.storage_path), exp.name)
    try:
        with console.progress(exp, run_dir, local=here):
            if here:
                result, best = fit_here(exp, infos)
            else:
                result = make_trainer(exp, infos).fit()
                best = best_checkpoint(result, exp.training.checkpoint_metric, exp.training.checkpoint_mode, run_dir)
    except TrainingFailedError as e:
        if raise_on_error:
            raise
        return TrainResult(run_dir, None, None, {}, read_history(run_dir), error=e, events=_events(run_dir))
    return TrainResult(
        run_dir=run_dir,
        checkpoint=storage.checkpoint_in(run_dir, result.checkpoint) if result.checkpoint else None,
        best_checkpoint=best,
        metrics=dict(result.metrics or {}),
        history=read_history(run_dir),
        events=_events(run_dir),
    )


def _events(run_dir: str) -> list[dict[str, Any]]:
    return [row for row in read_rows(run_dir) if "event" in row]


def best_checkpoint(result, metric: str, mode: str, run_dir: str) -> str | None:
    """A Ray Train `Result`'s kept checkpoint best by `metric` (`checkpoint.best_of`); None when none
    reported a number for it."""
    best = best_of(result.best_checkpoints or [], metric, mode)
    return None if best is None else storage.checkpoint_in(run_dir, best)


def print_summary(result: TrainResult) -> None:
    console.say(format_history(result.history))
    console.say(f"\nrun folder:        {result.run_dir}")
    console.say(f"latest checkpoint: {result.checkpoint}")
    if result.best_checkpoint:
        console.say(f"best checkpoint:   {result.best_checkpoint}")
    console.say(f"tensorboard:       tensorboard --logdir {storage.join(result.run_dir, 'tensorboard')}")
    if result.events:
        kinds = [e["event"] for e in result.events]
        console.say(f"resizes:           {kinds.count('resize')}, recoveries: {kinds.count('recovery')}")

