"""How raymtl starts or joins Ray: a lean local cluster unless asked otherwise (ray.init stubbed)."""

import logging
import os

import pytest
import ray

from raymtl import console, ray_runtime


@pytest.fixture
def init_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for key in (*ray_runtime.LEAN_ENV, "RAY_ADDRESS", ray_runtime.DASHBOARD_ENV):
        monkeypatch.setenv(key, "")  # recorded, so whatever ensure_ray sets is undone afterwards
        monkeypatch.delenv(key)
    return calls


def test_local_cluster_starts_without_dashboard_usage_stats_or_metrics(init_calls, monkeypatch):
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")  # the user's choice is kept
    ray_runtime.ensure_ray()
    (kw,) = init_calls
    assert kw["address"] == "local" and kw["include_dashboard"] is False
    assert kw["log_to_driver"] is False and kw["logging_level"] == logging.ERROR  # quiet console by default
    assert kw["num_cpus"] >= 4
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["RAY_enable_metrics_collection"] == "1"


@pytest.mark.parametrize("affinity, quota, expected", [(range(2), 64, 4), (range(64), 6, 6), (range(8), 8, 8)])
def test_a_local_cluster_offers_the_cores_this_process_may_use(init_calls, monkeypatch, affinity, quota, expected):
    """Its affinity and its container's quota, not the host's cores (`os.cpu_count()`); 4 at least."""
    import ray._private.utils

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity))
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda: quota)
    ray_runtime.ensure_ray()
    assert init_calls[0]["num_cpus"] == expected


@pytest.mark.parametrize("env, arg, expected", [("1", None, True), ("", True, True), ("1", False, False)])
def test_dashboard_on_request(init_calls, monkeypatch, env, arg, expected):
    monkeypatch.setenv(ray_runtime.DASHBOARD_ENV, env)
    ray_runtime.ensure_ray(dashboard=arg)
    assert init_calls[0]["include_dashboard"] is expected


def test_a_cluster_address_is_joined_as_it_is(init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    ray_runtime.ensure_ray()
    assert init_calls == [{"address": "ray://head:10001", **console.ray_logging()}]


def test_verbose_restores_rays_own_logs(init_calls, monkeypatch):
    monkeypatch.setitem(console._state, "verbose", True)
    ray_runtime.ensure_ray()
    assert init_calls[0]["log_to_driver"] is True and init_calls[0]["logging_level"] == logging.INFO


def test_cli_dashboard_flag_reaches_ensure_ray(init_calls):
    from raymtl import cli

    cli.use_dashboard(cli.build_parser().parse_args(["train", "exp.yaml", "--dashboard"]))
    ray_runtime.ensure_ray()
    assert init_calls[0]["include_dashboard"] is True


def test_a_command_shuts_down_the_local_cluster_it_started(init_calls, monkeypatch):
    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    with ray_runtime.command_session():
        ray_runtime.ensure_ray()
        assert shutdowns == []  # running while the command runs
    assert shutdowns == [True]
    with ray_runtime.command_session():
        pass  # a command that started nothing stops nothing
    assert shutdowns == [True]


def test_a_command_leaves_a_joined_cluster_running(init_calls, monkeypatch):
    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(RuntimeError):
        with ray_runtime.command_session():
            ray_runtime.ensure_ray()
            raise RuntimeError("the command failed")
    assert len(init_calls) == 1 and shutdowns == []


def test_dashboard_url_printed_when_asked(monkeypatch, capsys):
    """`--dashboard` (RAYMTL_DASHBOARD) names the dashboard of the cluster started or joined."""
    from types import SimpleNamespace

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: SimpleNamespace(dashboard_url="127.0.0.1:8265"))
    monkeypatch.setattr(ray_runtime, "_started_here", False)
    monkeypatch.setenv(ray_runtime.DASHBOARD_ENV, "1")
    ray_runtime.ensure_ray(address="10.0.0.1:6379")
    assert "Ray dashboard: http://127.0.0.1:8265" in capsys.readouterr().out
    monkeypatch.setenv(ray_runtime.DASHBOARD_ENV, "")
    ray_runtime.ensure_ray(address="10.0.0.1:6379")
    assert "dashboard" not in capsys.readouterr().out
