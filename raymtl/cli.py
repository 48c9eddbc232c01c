"""`raymtl <verb>`: thin argument parsing over the library.

Parse and check first, import heavy modules after: the config and `preflight` checks import no
torch, Ray or transformers, so a bad input is reported in about a second, as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from raymtl import console, preflight, ray_runtime, storage
from raymtl.config import ConfigError, Experiment, load_experiment
from raymtl.ray_runtime import DASHBOARD_ENV


def _training(exp: Experiment, **changes: Any) -> Experiment:
    return dataclasses.replace(exp, training=dataclasses.replace(exp.training, **changes))


# Flag (argparse dest) -> how it changes the experiment, applied in this order.
OVERRIDES: dict[str, Callable[[Experiment, Any], Experiment]] = {
    "workers": lambda exp, n: _training(exp, num_workers=n),
    "cpus_per_worker": lambda exp, n: _training(exp, cpus_per_worker=n),
    "gpu": lambda exp, _: _training(exp, use_gpu=True),
    "epochs": lambda exp, n: _training(exp, epochs=n, stages=[]),
    "name": lambda exp, name: dataclasses.replace(exp, name=name),
    "storage": lambda exp, path: dataclasses.replace(exp, storage_path=path),
}


@contextlib.contextmanager
def blaming(flag: str) -> Iterator[None]:
    """A config error raised inside is the flag's: prefix it (`--workers: training.num_workers: ...`)."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"--{flag.replace('_', '-')}: {e}") from None


def apply_overrides(exp: Experiment, args: argparse.Namespace) -> Experiment:
    """Command-line scaling and naming flags win over the (checked) config file.

    Any given value applies, a 0 too; each is checked as it is applied, so an error names its flag.
    """
    for flag, override in OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is not None and value is not False:  # --gpu is False when not given
            with blaming(flag):
                exp = override(exp, value).validate()
    return exp


def nonempty(text: str) -> str:
    """An argparse type: an empty --name puts a run's files at the storage root, an empty --storage in the cwd."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (the demo's flags, refused before its catalogue is written)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_scaling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="training workers (data-parallel ranks)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per training worker")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    p.add_argument("--epochs", type=int, help="override training.epochs (single stage)")
    p.add_argument("--name", type=nonempty, help="experiment name (same name = resume)")
    p.add_argument("--storage", type=nonempty, help="storage path or URI for checkpoints and logs")
    add_cluster_flags(p)


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local cluster")


def use_dashboard(args: argparse.Namespace) -> None:
    """`--dashboard` reaches `ensure_ray` through the environment, wherever the command starts Ray."""
    if getattr(args, "dashboard", False):
        os.environ[DASHBOARD_ENV] = "1"


def add_console_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs and full tracebacks")


def cmd_train(args: argparse.Namespace) -> int:
    from raymtl.models.hub import resolve_models

    exp = apply_overrides(load_experiment(args.config), args)
    preflight.check(exp)
    # Named models resolve before the trainer's imports (a missing one fails in a second; a text task's
    # tokenizer check loads transformers).
    exp = resolve_models(exp)
    console.open_log(storage.join(storage.normalize(exp.storage_path), exp.name))
    from raymtl.train.recipes import fit_recipe
    from raymtl.train.trainer import fit, print_summary

    print_summary(fit_recipe(exp, lambda e: fit(e, address=args.address)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raymtl.tune.records import format_summary, sweep_failure
    from raymtl.tune.spec import load_sweep
    from raymtl.tune.sweep import run_sweep, sweep_dir_of

    # light: the spec and the experiment, no torch or Ray; the sweep checked against the flags' experiment
    exp, spec = load_sweep(args.config, lambda exp: apply_overrides(exp, args))
    if args.max_concurrent is not None:
        with blaming("max_concurrent"):
            spec = dataclasses.replace(spec, max_concurrent=args.max_concurrent).validate(exp)
    preflight.check(exp)
    console.open_log(sweep_dir_of(exp))
    result = run_sweep(exp, spec, address=args.address)
    console.say(format_summary(result))
    console.say(f"tensorboard: tensorboard --logdir {storage.join(result.sweep_dir, 'tune')}  "
                "(every trial's per-task curves, one run per trial id)")
    failure = sweep_failure(result)
    if failure:
        print(f"raymtl: error: {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raymtl.demo import run_demo

    run_demo(args.out, workers=args.workers, epochs=args.epochs, address=args.address)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from raymtl.predict import predict

    summary = predict(
        args.model,
        args.input,
        args.output,
        tasks=args.tasks.split(",") if args.tasks else None,
        batch_size=args.batch_size,
        pool_size=args.pool_size,
        max_pool_size=args.max_pool_size,
        num_gpus=args.num_gpus,
        top_k=args.top_k,
        strict=args.strict,
        image_column=args.image_column,
        text_column=args.text_column,
        id_column=args.id_column,
        overwrite=args.overwrite,
        address=args.address,
        local=args.local,
    )
    print(summary)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from raymtl.models.hub import pull

    exp = load_experiment(args.config)
    if args.to:
        exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, models_cache=args.to))
    print("\n".join(pull(exp)) or "the config names no model to fetch")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from raymtl.evaluate import check_models, compare, evaluate, format_table, modality_table, write_results

    exp = load_experiment(args.config)
    tasks = args.tasks.split(",") if args.tasks else None
    shares = check_models(exp, args.model, args.baseline or [], tasks)
    options = dict(split=args.split, batch_size=args.batch_size, pool_size=args.pool_size, num_gpus=args.num_gpus,
                   address=args.address, local=args.local)
    modalities = ["both", "image", "text"] if args.modality == "all" else [args.modality]
    by_modality = {m: evaluate(args.model, exp, modality=m, tasks=tasks, **options) for m in modalities}
    evaluation = by_modality[modalities[0]]
    baselines = [evaluate(b, exp, modality=modalities[0], tasks=share, **options)
                 for b, share in zip(args.baseline or [], shares)]
    comparison = compare(evaluation, baselines) if baselines else None
    print(format_table(evaluation, comparison))
    if len(by_modality) > 1:
        print(f"\nprimary metric by modality (image: text masked; text: image masked)\n{modality_table(by_modality)}")
    write_results(args.out, evaluation, baselines, comparison, by_modality if len(by_modality) > 1 else None)
    print(f"wrote {args.out}/evaluation.json and evaluation.csv")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from raymtl.models.ensemble import build_ensemble

    print(f"ensemble of {len(args.members)} members -> {build_ensemble(args.members, args.out, args.weights)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymtl", description="Multi-task, multi-dataset training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a multi-task model from a YAML experiment")
    p.add_argument("config", help="experiment YAML file")
    add_scaling_flags(p)
    add_console_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="sweep task groupings, seeds and hyperparameters with Ray Tune")
    p.add_argument("config", help="experiment YAML with a top-level `sweep:` section")
    add_scaling_flags(p)
    p.add_argument("--max-concurrent", type=int, help="override sweep.max_concurrent (trials at a time)")
    add_console_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("pull", help="fetch every model a config names (for offline clusters)")
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("--to", help="models cache folder to fill (default: the config's model.models_cache, "
                   "else the torch and Hugging Face caches)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("demo", help="generate a synthetic catalogue and train an image+text model on it")
    p.add_argument("--out", default="demo_output", help="folder for the demo data, config and runs")
    p.add_argument("--workers", type=positive, default=1, help="training workers")
    p.add_argument("--epochs", type=positive, help="override the demo config's epochs")
    add_cluster_flags(p)
    add_console_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="predict every item of a table or image folder with a saved model")
    p.add_argument("model", help="saved model folder or URI (any checkpoint folder)")
    p.add_argument("input", help="parquet/CSV file, folder, glob or URI of items, or a folder of images")
    p.add_argument("output", help="parquet output folder or URI")
    p.add_argument("--tasks", help="comma-separated tasks to predict (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="items per model call")
    p.add_argument("--pool-size", type=int, default=1, help="model actors at the start")
    p.add_argument("--max-pool-size", type=int, help="model actors at most, added while items queue (default: --pool-size)")
    p.add_argument("--num-gpus", type=float, help="GPUs per model actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--top-k", type=int, default=0, help="also write the K best labels and scores per task")
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of marking it")
    p.add_argument("--image-column", help="image column of the input (default: the one trained on)")
    p.add_argument("--text-column", help="text column of the input (default: the one trained on)")
    p.add_argument("--id-column", help="id column of the input (default: the one trained on, else the image)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--local", action=argparse.BooleanOptionalAction,
                   help="predict in this process, not on Ray Data's actors (default: an input of at most "
                        "raymtl.predict.LOCAL_ROWS items, unless --num-gpus, --max-pool-size or --address is given)")
    add_cluster_flags(p)
    add_console_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="per-task metrics of a saved model or ensemble on labelled data")
    p.add_argument("model", help="saved model or ensemble folder or URI")
    p.add_argument("config", help="experiment YAML whose tasks name the labelled data (validation:/test: sources)")
    p.add_argument("--split", choices=["validation", "test"], default="validation")
    p.add_argument("--out", default="evaluation", help="folder for evaluation.json and evaluation.csv")
    p.add_argument("--baseline", nargs="+", help="models to compare with, each scored on the evaluated tasks it predicts "
                   "(per task: the mean of those that predict it)")
    p.add_argument("--tasks", help="comma-separated tasks to evaluate (default: the model's tasks in the config)")
    p.add_argument("--modality", choices=["both", "image", "text", "all"], default="both",
                   help="inputs the model sees: image (text masked), text (image masked), both, or a report of all "
                        "three; a masked modality feeds zeros into its fusion slot")
    p.add_argument("--batch-size", type=int, default=64, help="items per model call")
    p.add_argument("--pool-size", type=int, default=1, help="model actors")
    p.add_argument("--num-gpus", type=float, help="GPUs per model actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--local", action=argparse.BooleanOptionalAction,
                   help="score in this process, not on Ray Data's actors (default: a task whose split has at most "
                        "raymtl.predict.LOCAL_ROWS rows, unless --num-gpus or --address is given)")
    add_cluster_flags(p)
    add_console_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ensemble", help="one saved model averaging the probabilities of several saved models")
    p.add_argument("members", nargs="+", help="saved model folders or URIs (same tasks and label maps)")
    p.add_argument("--out", required=True, help="folder or URI for the ensemble (must not exist)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per member (default: equal)")
    p.set_defaults(func=cmd_ensemble)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a verb; any failure, in this process or deep inside Ray, ends as one `raymtl: error:` line.

    Exit status 2 for a config or data fault found before training, 1 for a failure during it.
    """
    args = build_parser().parse_args(argv)
    console.configure(verbose=getattr(args, "verbose", False))
    use_dashboard(args)
    try:
        with ray_runtime.command_session():
            return args.func(args)
    except KeyboardInterrupt:
        print("raymtl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the one place every failure is turned into a line
        console.log_error(e)
        if getattr(args, "verbose", False):
            traceback.print_exception(e, file=sys.stderr)
        print(console.error_line(e), file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
