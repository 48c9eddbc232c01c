"""Test-only fault injection: a Train worker that kills itself once, mid-run, to test recovery
(a run in the driver's own process raises instead).

Set `CRASH_ENV` (a global step) in the driver's environment: `trainer.forwarded_env` passes it to
the workers' runtime env. Rank 0 exits at that step once per run folder (a marker file records it),
so the restarted worker group resumes and finishes.
"""

from __future__ import annotations

import os

from raymtl import storage

CRASH_ENV = "RAYMTL_TEST_CRASH_AT_STEP"
CRASH_MARKER = ".debug_crash_done"


class InjectedCrash(RuntimeError):
    """The test fault of a run in the driver's own process, which must not kill the process."""


def maybe_crash(run_dir: str, global_step: int, rank: int, in_process: bool = False) -> None:
    """Exit this process (as a crash would) when rank 0 reaches the step `CRASH_ENV` names, once;
    a run in the driver's process (`in_process`) raises `InjectedCrash` instead."""
    at = os.environ.get(CRASH_ENV)
    if not at or global_step != int(at) or rank != 0:
        return
    marker = storage.join(run_dir, CRASH_MARKER)
    if not storage.exists(marker):
        storage.write_text(marker, f"crashed at step {global_step}\n")
        if in_process:
            raise InjectedCrash(f"injected crash at step {global_step}")
        os._exit(1)
