"""End to end: `ray job submit` of the demo job to a real Ray head, as on a cluster.

The head is a separate cluster: `ray start --head` in its own process session, dashboard
on 127.0.0.1, free ports, a short --temp-dir (Unix socket paths are limited to ~107 chars). It has
token auth on: RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN in the env of the head and of every
`ray` CLI call, so ~/.ray/auth_token is neither read nor written. Every `ray` command runs in a
subprocess whose env has no RAY_* variables of this session (no RAY_ADDRESS), so the in-process
cluster of the `ray_cluster` fixture is neither used nor disturbed. Teardown ends the head's
process session by id, never `ray stop`: that kills every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

import raymtl
from benchmarks.proc_tree import kill, session_pids

# Starts its own Ray head. Timeout: head <= 240 s, job <= SUBMIT_TIMEOUT_S + 60 s, teardown <= 30 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SUBMIT_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(token: str) -> dict[str, str]:
    """This session's env without RAY_*, with the venv first on PATH (the job's `python`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",  # no report to usage.ray.io
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def stop_session(sid: int, grace_s: float = 3) -> None:
    """SIGTERM every process of the head's session (Ray's workers put themselves in their own process
    groups, never in another session), then SIGKILL what is left after `grace_s` (the GCS server and
    the raylet outlast 12 s of it; nothing of this throwaway cluster needs a clean exit)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        kill(session_pids(sid), sig)
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.5)


def get_json(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def wait_for_dashboard(url: str, token: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get_json(f"{url}/api/version", token)
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the dashboard at {url} did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def ray_head(tmp_path):
    """(dashboard URL, env for `ray` commands) of a fresh head; always torn down.

    Not `--block`: that kills the whole node when any one process dies (the Ray Client server gives
    up after 30 s without the raylet on a loaded machine), and the test uses no Ray Client.
    """
    token = secrets.token_hex(32)
    env = clean_env(token)
    temp_dir = tempfile.mkdtemp(prefix="rmtl-", dir="/tmp")
    dashboard = free_port()
    log = tmp_path / "ray_start.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--num-cpus=4", f"--temp-dir={temp_dir}",
             f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        if head.wait(timeout=120) != 0:
            pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(url, token, log)
        yield url, env
    finally:
        stop_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(env: dict, *args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def submit(url: str, env: dict, workdir: Path, submission: str, *entrypoint: str) -> str:
    """Submit from `workdir` (uploaded as the working dir), wait, check SUCCEEDED; the output."""
    args = ["job", "submit", "--address", url, "--submission-id", submission,
            "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint]  # fmt: skip
    try:
        done = ray_cli(env, *args, cwd=workdir, timeout=SUBMIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        ray_cli(env, "job", "stop", "--address", url, submission, timeout=30)
        logs = ray_cli(env, "job", "logs", "--address", url, submission, timeout=30).stdout
        pytest.fail(f"job {submission} did not finish within {SUBMIT_TIMEOUT_S} s:\n{logs[-6000:]}")
    output = f"{done.stdout}\n{done.stderr}"[-8000:]
    try:
        status = get_json(f"{url}/api/jobs/{submission}", env["RAY_AUTH_TOKEN"])["status"]
    except OSError as e:
        status = f"unknown, the dashboard is gone ({e})"
    assert done.returncode == 0 and status == "SUCCEEDED", f"job {submission}: {status}\n{output}"
    return output


def test_demo_job_trains_on_a_submitted_cluster(ray_head, tmp_path):
    """jobs/demo_data.py (the RayJob's entrypoint) makes a small catalogue and trains one epoch."""
    url, env = ray_head
    workdir = tmp_path / "job"  # what the job needs, nothing else: jobs/
    shutil.copytree(REPO / "jobs", workdir / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    run = tmp_path / "runs" / "e2e"
    output = submit(url, env, workdir, "raymtl-e2e", "python", "jobs/demo_data.py", "--out", str(tmp_path / "data"),
                    "--sizes", "color=64", "style=64", "--image-size", "32", "--epochs", "1", "--workers", "1",
                    "--cpus-per-worker", "1", "--name", run.name, "--storage", str(run.parent))  # fmt: skip

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1], output
    assert "val/color/accuracy" in rows[0] and "val/style/micro_f1" in rows[0], rows[0]
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())  # not checkpoint_manager_snapshot.json
    assert checkpoints, output
    assert sorted(raymtl.load(checkpoints[-1]).tasks) == ["color", "style"]
