"""Failures no retry can fix: a config or data error (`raymtl.errors.ConfigError`, `DataError`) ends
a run at once.

The data order is a pure function of the seed, so a retry from the newest checkpoint would meet the
same unreadable image at the same step, and a config a worker finds wrong (bf16 asked of a GPU
without it) is as wrong at the next attempt: `training.max_failures` is for faults that may pass (a
lost node, a killed process, a store that kept failing). A run in the driver's process checks
`is_permanent` before retrying; Ray Train's controller gets `PermanentErrorPolicy`, its default failure
policy except that a worker group that failed on such an error is not retried.
"""

from __future__ import annotations

from ray.train import WorkerGroupError
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from raymtl.console import root_cause
from raymtl.errors import ConfigError


def is_permanent(error: BaseException) -> bool:
    """Whether `error` (under any of Ray's wrappers) is a fault of the config or the data itself."""
    return isinstance(root_cause(error), ConfigError)


class PermanentErrorPolicy(DefaultFailurePolicy):
    """Ray Train's default policy; a worker's config or data error raises at once, spending no retry."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError) and any(
            is_permanent(e) for e in training_failed_error.worker_failures.values()
        ):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """`TorchTrainer` whose controller runs `PermanentErrorPolicy` (Ray Train has no public setting for it)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = PermanentErrorPolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
