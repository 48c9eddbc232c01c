"""`raymtl <verb>`: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from raymtl.config import ConfigError, Experiment, load_experiment


def apply_overrides(exp: Experiment, args: argparse.Namespace) -> Experiment:
    """Command-line scaling and naming flags win over the config file."""
    tr = exp.training
    if getattr(args, "workers", None):
        tr = dataclasses.replace(tr, num_workers=args.workers)
    if getattr(args, "cpus_per_worker", None):
        tr = dataclasses.replace(tr, cpus_per_worker=args.cpus_per_worker)
    if getattr(args, "gpu", False):
        tr = dataclasses.replace(tr, use_gpu=True)
    if getattr(args, "epochs", None):
        tr = dataclasses.replace(tr, epochs=args.epochs, stages=[])
    exp = dataclasses.replace(exp, training=tr)
    if getattr(args, "name", None):
        exp = dataclasses.replace(exp, name=args.name)
    if getattr(args, "storage", None):
        exp = dataclasses.replace(exp, storage_path=args.storage)
    return exp.validate()


def add_scaling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="training workers (data-parallel ranks)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per training worker")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    p.add_argument("--epochs", type=int, help="override training.epochs (single stage)")
    p.add_argument("--name", help="experiment name (same name = resume)")
    p.add_argument("--storage", help="storage path or URI for checkpoints and logs")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")


def cmd_train(args: argparse.Namespace) -> int:
    from raymtl.train.trainer import fit, print_summary

    exp = apply_overrides(load_experiment(args.config), args)
    print_summary(fit(exp, address=args.address))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raymtl.tune.sweep import format_summary, load_sweep, run_sweep, sweep_failure

    exp, spec = load_sweep(args.config)
    exp = apply_overrides(exp, args)
    if args.max_concurrent:
        spec = dataclasses.replace(spec, max_concurrent=args.max_concurrent)
    result = run_sweep(exp, spec, address=args.address)
    print(format_summary(result))
    failure = sweep_failure(result)
    if failure:
        print(f"raymtl: error: {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raymtl.demo import run_demo

    run_demo(args.out, workers=args.workers or 1, epochs=args.epochs, address=args.address)
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
        num_gpus=args.num_gpus,
        top_k=args.top_k,
        strict=args.strict,
        image_column=args.image_column,
        text_column=args.text_column,
        id_column=args.id_column,
        overwrite=args.overwrite,
        address=args.address,
    )
    print(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from raymtl.evaluate import compare, evaluate, format_table, write_results

    options = dict(split=args.split, tasks=args.tasks.split(",") if args.tasks else None, batch_size=args.batch_size,
                   pool_size=args.pool_size, num_gpus=args.num_gpus, address=args.address)
    evaluation = evaluate(args.model, args.config, **options)
    baselines = [evaluate(b, args.config, **options) for b in args.baseline or []]
    comparison = compare(evaluation, baselines) if baselines else None
    print(format_table(evaluation, comparison))
    write_results(args.out, evaluation, baselines, comparison)
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="sweep task groupings, seeds and hyperparameters with Ray Tune")
    p.add_argument("config", help="experiment YAML with a top-level `sweep:` section")
    add_scaling_flags(p)
    p.add_argument("--max-concurrent", type=int, help="override sweep.max_concurrent (trials at a time)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="generate a synthetic catalogue and train an image+text model on it")
    p.add_argument("--out", default="demo_output", help="folder for the demo data, config and runs")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int)
    p.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="predict every item of a table or image folder with a saved model (Ray Data)")
    p.add_argument("model", help="saved model folder or URI (any checkpoint folder)")
    p.add_argument("input", help="parquet/CSV file, folder, glob or URI of items, or a folder of images")
    p.add_argument("output", help="parquet output folder or URI")
    p.add_argument("--tasks", help="comma-separated tasks to predict (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="items per model call")
    p.add_argument("--pool-size", type=int, default=1, help="model actors")
    p.add_argument("--num-gpus", type=float, help="GPUs per model actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--top-k", type=int, default=0, help="also write the K best labels and scores per task")
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of marking it")
    p.add_argument("--image-column", help="image column of the input (default: the one trained on)")
    p.add_argument("--text-column", help="text column of the input (default: the one trained on)")
    p.add_argument("--id-column", help="id column of the input (default: the one trained on, else the image)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="per-task metrics of a saved model or ensemble on labelled data (Ray Data)")
    p.add_argument("model", help="saved model or ensemble folder or URI")
    p.add_argument("config", help="experiment YAML whose tasks name the labelled data (validation:/test: sources)")
    p.add_argument("--split", choices=["validation", "test"], default="validation")
    p.add_argument("--out", default="evaluation", help="folder for evaluation.json and evaluation.csv")
    p.add_argument("--baseline", nargs="+", help="models to compare with (per task: those that predict it)")
    p.add_argument("--tasks", help="comma-separated tasks to evaluate (default: the model's tasks in the config)")
    p.add_argument("--batch-size", type=int, default=64, help="items per model call")
    p.add_argument("--pool-size", type=int, default=1, help="model actors")
    p.add_argument("--num-gpus", type=float, help="GPUs per model actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ensemble", help="one saved model averaging the probabilities of several saved models")
    p.add_argument("members", nargs="+", help="saved model folders or URIs (same tasks and label maps)")
    p.add_argument("--out", required=True, help="folder or URI for the ensemble (must not exist)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per member (default: equal)")
    p.set_defaults(func=cmd_ensemble)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"raymtl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
