"""`raymtl tune`'s console: one line per finished trial instead of Tune's status tables.

Imported only when trials run (it imports Ray Tune); the sweep's summary table follows at the end.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from raymtl import console


class TrialLines(tune.Callback):
    """Says, as each trial ends, its config, its last sweep metric and epoch, and how many are done."""

    def __init__(self, metric: str, total: int) -> None:
        self.metric = metric
        self.total = total
        self.ended = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, "failed")

    def _say(self, trial: Any, outcome: str) -> None:
        self.ended += 1
        console.say(f"[{self.ended}/{self.total}] {trial_line(trial.trial_id, trial.config, trial.last_result or {}, self.metric, outcome)}")


def trial_line(trial_id: str, config: dict[str, Any], result: dict[str, Any], metric: str, outcome: str) -> str:
    """`trial_id done: grouping=one_group lr=0.001 | val/mean_score 0.8123 at epoch 3, 41 s`."""
    settings = " ".join(f"{key}={value}" for key, value in config.items())
    value = result.get(metric)
    score = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else f"no {metric}"
    epoch = f" at epoch {result['epoch']}" if "epoch" in result else ""
    return f"{trial_id} {outcome}: {settings} | {score}{epoch}, {result.get('time_total_s', 0.0):.0f} s"
