"""Shared fixtures: one local Ray cluster for the whole test session."""

import logging
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller looks at its workers every 2 s: a run's end was seen up to 2 s late, ~35
# times a suite. Every 0.5 s here (Ray passes RAY_TRAIN_* to the controller; subprocesses inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one (started lazily, once), as lean as the
    one `raymtl` starts (`ray_runtime.LEAN_ENV`: no preemption watcher actor per run, no metrics), but
    with the workers' logs shown.

    2 physical cores: 4 logical CPUs so Ray Data is not starved behind the train workers.
    """
    import ray

    from raymtl.ray_runtime import LEAN_ENV

    if not ray.is_initialized():
        for key, value in LEAN_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_folders_removed(request, tmp_path_factory):
    """A module's temporary folders go when its tests pass (kept when one fails, to look at).

    Run folders hold checkpoints of ~100 MB each: kept for the whole session they add up to many GB,
    more than a CI machine's disk may have free. Function-level folders go at once
    (`tmp_path_retention_policy = "failed"`); these are the module-scoped fixtures' ones."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _command_log_closed():
    """A `raymtl` command opens its run's log once per process (`console.open_log`); in a test
    session each test's stays with it: its file handlers are closed and no later error line names it."""
    from raymtl import console

    loggers = [logging.getLogger(name) for name in ("raymtl.logfile", "py.warnings", "raymtl", "ray")]
    before = [set(logger.handlers) for logger in loggers]
    yield
    for logger, kept in zip(loggers, before):
        for handler in set(logger.handlers) - kept:
            if not isinstance(handler, logging.FileHandler):  # Ray's own, set up on its first import
                continue
            logger.removeHandler(handler)
            handler.close()
    console._state["log_path"] = None


def pytest_collection_modifyitems(items):
    """A test that uses the shared Ray cluster is slow (seconds to minutes on 2 cores): `-m "not slow"` skips it.

    Tests that start their own Ray or train for long are marked `slow` by hand."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
