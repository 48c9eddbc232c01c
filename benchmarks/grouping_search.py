"""Grouping search on the planted-cluster benchmark: does the searched grouping beat the baselines,
and what does the search cost?

    python -m benchmarks.grouping_search --json grouping_search.json
    python -m benchmarks.grouping_search --latents-per-cluster 2 --hidden-dim 4 --n-per-task 1280 \
        --every 20 --seeds 0 1 2 --top 1 --json benchmarks/results/grouping_search_interfering.json

One `raymtl tune`-style sweep (`groupings: search`) over `raymtl.data.planted` tasks in
`--clusters` clusters of `--tasks-per-cluster`: an all-in-one training measures the affinity Z,
the `--top` best groupings (by the TAG score, at most `--max-groups` groups) train as Tune trials
beside all-in-one (`one_group`) and one-backbone-per-task (`one_per_task`), each with every
`--seeds` seed. Then one extra training of a single task pair prices the pairwise alternative:
training every pair of tasks, T(T-1)/2 runs, and reading affinity off their validation scores.

With `--latents-per-cluster 2` and a narrow `--hidden-dim` the clusters interfere destructively
(see `raymtl.data.planted`). The sweep also builds the ensemble of the chosen grouping's seeds
(`ensemble: true`), and the comparison shows every grouping trained (all-in-one, one-per-task,
the searched ones; mean ± std over seeds, per task), the ensemble and its best member, each with
LibMTL's Δ% against one-per-task, and whether the targets hold: chosen >= all-in-one + 2 points of
mean accuracy, search <= 0.5 x the pairwise search, the ensemble above its best member.

Every model of the comparison is scored on a test split of `--n-test-per-task` items per task that
no choice saw. Validation picked each trial's best epoch, the chosen grouping and the best member
(the chosen grouping's seed best on validation); scored on validation, the picked ones carry that
selection's luck as an advantage, which the ensemble, an average of its members, does not share.

Reported (JSON at `--json`, and printed): per grouping the per-task validation accuracy at each
trial's best epoch, averaged over seeds (what the sweep chose by); the comparison on test; the
affinity's best groupings; the chosen grouping and whether it is the planted one;
the search cost (the affinity run's wall time) against one all-in-one training (the `one_group`
trials' mean wall time) and against pairwise search (the measured pair time times T(T-1)/2), also
in gradient steps, which do not depend on the machine's load; and the 1-minute load average before,
during (sampled) and after the run. Use a fresh `--root` for timings:
the same root resumes (restores) the finished sweep instead of training again.

`--search-only` stops after the search: the affinity run and the ranking of the groupings (is the
planted one first?), its wall time and the load, without the trials, the test scores or the pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from raymtl.data.planted import make_planted, planted_experiment, resolve_clusters
from raymtl.data.inspection import inspect_tasks
from raymtl.config import Experiment
from raymtl.evaluate import Evaluation, compare, evaluate
from raymtl.train.metrics import summary_table
from raymtl.train.trainer import check_schedule, fit
from raymtl.tune.groupings import best_groupings, score_partition
from raymtl.tune.candidates import read_affinity
from raymtl.tune.records import SweepResult, format_summary, task_metric_keys
from raymtl.tune.spec import SweepSpec
from raymtl.tune.sweep import load_or_search, run_sweep, sweep_dir_of


METRICS = ("accuracy", "macro_f1", "loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="grouping_search_runs", help="folder for the data and all runs")
    parser.add_argument("--json", "--out", dest="json", default="grouping_search.json", help="report file")
    parser.add_argument("--clusters", type=int, default=2)
    parser.add_argument("--tasks-per-cluster", type=int, default=2)
    parser.add_argument("--latents-per-cluster", type=int, default=1, help="> 1: clusters that interfere")
    parser.add_argument("--hidden-dim", type=int, default=32, help="model.hidden_dim: the shared representation")
    parser.add_argument("--n-per-task", type=int, default=320, help="items per task (a fifth for validation)")
    parser.add_argument("--n-test-per-task", type=int, default=1024, help="further items per task, held out for test")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every training, the search run included")
    parser.add_argument("--optimizer", default="adamw", help="adamw | sgd (sgd: the lookahead step is the update)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-groups", type=int, default=2)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--every", type=int, default=4, help="measure Z every N steps in the search run")
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--search-only", action="store_true", help="the affinity run and the ranking only")
    return parser.parse_args(argv)


def per_grouping(result: SweepResult) -> dict[str, dict[str, float]]:
    """Per grouping: each task's primary metric and the sweep metric, averaged over its seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for trial in result.trials:
        if trial.best is None:
            continue
        keys = [*task_metric_keys(result.tasks, trial.best), result.metric]
        values = out.setdefault(trial.config["grouping"], {k: [] for k in keys})
        for key in keys:
            values[key].append(trial.best[key])
    return {name: {k: statistics.mean(v) for k, v in values.items()} | {"seeds": len(values[result.metric])}
            for name, values in out.items()}


def scores_on_test(result: SweepResult, exp: Experiment) -> dict[str, dict[str, dict[str, float]]]:
    """Each trial's best checkpoint (its epoch picked on validation) scored on the test split, by trial id."""
    return {t.trial_id: evaluate(t.checkpoint, exp, split="test", local=True).tasks
            for t in result.trials if t.checkpoint}


def comparison(result: SweepResult, test: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """On test: every grouping trained (per task mean and std over seeds), the ensemble and its best member.

    Each with LibMTL's Δ% against one-per-task, over every task's accuracy, macro-F1 and loss.
    """
    def summary(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
        return {task: {m: float(statistics.mean(r[task][m] for r in rows)) for m in METRICS}
                | {"accuracy_std": float(statistics.pstdev([r[task]["accuracy"] for r in rows]))}
                for task in result.tasks}

    models = {c.name: summary([test[t.trial_id] for t in result.trials
                               if t.config["grouping"] == c.name and t.trial_id in test])
              for c in result.candidates}
    if result.ensemble:
        models["ensemble"] = strip(result.ensemble["metrics"])
    models["best_member"] = strip(test[result.choice.trial_id])
    baseline = Evaluation("one_per_task", "test", strip(models["one_per_task"]))
    out: dict[str, Any] = {"split": "test", "chosen_grouping": result.choice.config["grouping"], "models": {}}
    for name, tasks in models.items():
        delta = compare(Evaluation(name, "test", strip(tasks)), [baseline]).delta_percent
        mean_acc = statistics.mean(m["accuracy"] for m in tasks.values())
        out["models"][name] = {"tasks": tasks, "mean_accuracy": mean_acc, "delta_percent_vs_one_per_task": delta}
    return out


def strip(tasks: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {t: {m: v for m, v in metrics.items() if m in METRICS} for t, metrics in tasks.items()}


def format_comparison(report: dict[str, Any], tasks: list[str]) -> str:
    labels = {"one_group": "one_group (all-in-one)", report["chosen_grouping"]: f"{report['chosen_grouping']} (chosen)",
              "best_member": "best member (best on validation)"}
    rows = []
    for name, model in report["models"].items():
        row = {"model": labels.get(name, name)}
        row.update({t: cell(model["tasks"][t]) for t in tasks})
        row.update({"mean acc": model["mean_accuracy"], "Δ% vs 1/task": model["delta_percent_vs_one_per_task"]})
        rows.append(row)
    return summary_table(rows)


def cell(metrics: dict[str, float]) -> str:
    """Accuracy, ± its std over seeds where there are seeds (the ensemble is one model)."""
    spread = f" ± {metrics['accuracy_std']:.3f}" if "accuracy_std" in metrics else ""
    return f"{metrics['accuracy']:.3f}{spread}"


def targets(report: dict[str, Any], result: SweepResult, cost: dict[str, float]) -> dict[str, Any]:
    """The issue's targets, accuracies on the comparison's (test) split."""
    models = report["models"]
    gain = models[report["chosen_grouping"]]["mean_accuracy"] - models["one_group"]["mean_accuracy"]
    out = {"chosen_minus_all_in_one": gain, "chosen_beats_all_in_one_by_2_points": gain >= 0.02,
           "search_vs_pairwise": cost["search_vs_pairwise"], "search_at_most_half_pairwise": cost["search_vs_pairwise"] <= 0.5}
    if result.ensemble:
        out["ensemble_split"] = result.ensemble["split"]
        out["ensemble_mean_score"] = result.ensemble["mean_score"]
        out["best_member_score"] = result.ensemble["best_member_score"]
        out["ensemble_beats_best_member"] = result.ensemble["mean_score"] > result.ensemble["best_member_score"]
    return out


def costs(result: SweepResult, pair_s: float, steps_all: int, n_tasks: int, every: int, rows_per_batch: float) -> dict[str, float]:
    """Search vs one all-in-one training vs pairwise search, in wall seconds and in gradient steps.

    Pairwise trains T(T-1)/2 pairs, each on 2/T of the all-in-one steps: (T-1) all-in-one trainings
    of steps. The search run is one all-in-one training plus, every `every` steps, T lookahead
    gradients and T^2 forward passes (a forward pass counted as a third of a step), each on
    `affinity_rows` rows, i.e. `rows_per_batch` training batches.
    """
    pairs = n_tasks * (n_tasks - 1) // 2
    one_group = [t.wall_s for t in result.trials if t.config["grouping"] == "one_group"]
    all_in_one_s = statistics.mean(one_group)
    lookahead = steps_all / every * (n_tasks + n_tasks**2 / 3) * rows_per_batch
    return {
        "search_s": result.search_s,
        "all_in_one_s": all_in_one_s,
        "pair_s": pair_s,
        "pairwise_s": pair_s * pairs,
        "search_vs_all_in_one": result.search_s / all_in_one_s,
        "search_vs_pairwise": result.search_s / (pair_s * pairs),
        "steps_all_in_one": steps_all,
        "steps_search": steps_all + lookahead,
        "steps_pairwise": (n_tasks - 1) * steps_all,
        "sweep_trial_hours": result.trial_hours,
    }


class LoadSampler:
    """The 1-minute load average before, every `every_s` seconds during, and after the run.

    Wall times are only comparable at a known load: on a small shared box other work, and the
    run's own concurrent trials, both show up here.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s, self.before, self.samples = every_s, os.getloadavg()[0], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        during = self.samples or [os.getloadavg()[0]]
        return {"cpus": os.cpu_count(), "before": self.before, "after": os.getloadavg()[0],
                "during_mean": statistics.mean(during), "during_max": max(during), "every_s": self.every_s}


def ranking(z, tasks: list[str], clusters: list[list[str]], max_groups: int) -> dict[str, Any]:
    """The affinity's best groupings and where the planted one stands among them."""
    ranked = best_groupings(z, tasks, max_groups, 3)
    planted = {frozenset(c) for c in clusters}
    return {"tasks": tasks, "mean": z.tolist(), "best_groupings": [{"groups": g, "score": v} for g, v in ranked],
            "top_is_planted": {frozenset(g) for g in ranked[0][0].values()} == planted,
            "planted_score": score_partition([list(c) for c in clusters], z, tasks)}


def search_only(args: argparse.Namespace, exp: Experiment, spec: SweepSpec, clusters, load: "LoadSampler") -> dict:
    found, search_s = load_or_search(exp, spec, sweep_dir_of(exp))
    tasks, z = read_affinity(str(Path(sweep_dir_of(exp)) / "affinity"))
    report = {"setup": vars(args) | {"root": Path(args.root).name, "tasks": exp.task_names,
                                     "planted": [list(c) for c in clusters]},
              "search_s": search_s, "candidates": [dataclasses.asdict(c) for c in found],
              "affinity": ranking(z, tasks, clusters, args.max_groups), "load": load.stop()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report["affinity"][k] for k in ("best_groupings", "top_is_planted", "planted_score")}
                     | {"search_s": search_s, "load": report["load"]}, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load = LoadSampler()
    root = Path(args.root).resolve()
    clusters = resolve_clusters(n_clusters=args.clusters, tasks_per_cluster=args.tasks_per_cluster)
    catalogue = make_planted(root / "data", clusters=clusters, n_per_task=args.n_per_task,
                             latents_per_cluster=args.latents_per_cluster, n_test=args.n_test_per_task)
    training = {"epochs": args.epochs, "optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size}
    exp = planted_experiment(catalogue, str(root / "runs"), name="planted", training=training,
                             model={"hidden_dim": args.hidden_dim})
    spec = SweepSpec(
        groupings="search", max_groups=args.max_groups, top=args.top, seeds=args.seeds,
        max_concurrent=args.max_concurrent, affinity_epochs=args.epochs, affinity_every_steps=args.every,
        ensemble=True,
    )
    if args.search_only:
        return search_only(args, exp, spec, clusters, load)
    started = time.monotonic()
    result = run_sweep(exp, spec)
    sweep_s = time.monotonic() - started
    print(format_summary(result))
    test = scores_on_test(result, exp)

    pair = dataclasses.replace(exp, name="pair", tasks=exp.tasks[:2])
    started = time.monotonic()
    fit(pair)
    pair_s = time.monotonic() - started
    steps_all = sum(check_schedule(exp, inspect_tasks(exp)).values()) * args.epochs

    tasks, z = read_affinity(str(Path(result.sweep_dir) / "affinity"))
    planted = {frozenset(c) for c in clusters}
    chosen = next(c for c in result.candidates if c.name == result.choice.config["grouping"])
    top = max(result.candidates, key=lambda c: c.score)
    cost = costs(result, pair_s, steps_all, len(exp.tasks), args.every,
                 exp.training.affinity_rows / exp.training.batch_size) | {"sweep_wall_s": sweep_s}
    compared = comparison(result, test)
    report = {
        "load": load.stop(),
        # the root by its name only: the report is meant to be shared, the folder is this machine's
        "setup": vars(args) | {"root": root.name, "tasks": exp.task_names, "planted": [list(c) for c in clusters]},
        "candidates": [dataclasses.asdict(c) for c in result.candidates],
        "affinity": ranking(z, tasks, clusters, args.max_groups),
        "per_grouping": per_grouping(result),
        "chosen": chosen.name,
        "chosen_groups": chosen.groups,
        "chosen_is_planted": {frozenset(g) for g in chosen.groups.values()} == planted,
        "top_score_is_planted": {frozenset(g) for g in top.groups.values()} == planted,
        "cost": cost,
        "comparison": compared,
        "targets": targets(compared, result, cost),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(format_comparison(compared, exp.task_names))
    print(json.dumps({k: report[k] for k in ("chosen", "chosen_is_planted", "load", "cost", "targets")}, indent=2))
    return report


if __name__ == "__main__":
    main()
