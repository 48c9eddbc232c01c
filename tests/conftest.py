"""Shared fixtures: one local Ray cluster for the whole test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one (started lazily, once).

    2 physical cores: 4 logical CPUs so Ray Data is not starved behind the train workers.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    """A test that uses the shared Ray cluster is slow (seconds to minutes on 2 cores): `-m "not slow"` skips it.

    Tests that start their own Ray or train for long are marked `slow` by hand."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
