"""benchmarks/gpu.py keeps working: its tiny CPU configuration, the bare loop, a raymtl run trained
in the process and `raymtl predict` over its model (the Train-worker and streamed modes share the
in-process mode's code and are left out for time)."""

import json
import os
import subprocess
import time

import pytest

from benchmarks import gpu


@pytest.mark.slow
def test_gpu_check_runs_its_modes_and_writes_their_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    report = gpu.main(["--tiny", "--modes", "bare", "in_process", "predict", "--json", str(out),
                       "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text())["modes"].keys() == {"bare", "in_process", "predict"}
    assert report["errors"] == {}
    modes = report["modes"]
    for mode in ("bare", "in_process", "predict"):
        assert modes[mode]["items_per_s"] > 0, mode
        assert modes[mode]["host_peak_pss_mb"] > 0, mode
    assert modes["in_process"]["epochs_reported"] == gpu.TINY.epochs
    assert 0 <= modes["in_process"]["data_wait_fraction"] < 1
    assert modes["predict"]["rows"] == gpu.TINY.images * gpu.TINY.predict_repeat
    assert modes["predict"]["small_rows"] == gpu.TINY.images
    assert report["summary"]["in_process_vs_bare"] > 0
    assert report["environment"]["torch"]
    for mode in ("bare", "in_process", "predict"):  # what ran beside the step, and nothing left behind
        assert modes[mode]["cpu_s"] > 0, mode
        assert sum(modes[mode]["cpu_s_by_process"].values()) <= modes[mode]["cpu_s"] + 0.1, mode
        assert modes[mode]["killed_after_settle"] == [], mode
        assert 0 <= modes[mode]["cores_busy_before"] <= report["environment"]["cpus"], mode
    assert any("ray::" in name for name in modes["predict"]["cpu_s_by_process"])  # its actors are in the tree


def test_a_modes_leftover_processes_are_waited_for_then_killed():
    """A process the mode's command left running in its session (as Ray's daemons could) is killed
    after the wait, and named; a session with nothing left returns at once."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 >/dev/null & echo $!"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    orphan = int(proc.stdout.readline())
    proc.wait()
    start = time.perf_counter()
    left = gpu.outlive(proc.pid, wait_s=1.0)
    assert 1.0 <= time.perf_counter() - start < 10
    assert left["killed_after_settle"] == ["sleep 60"]
    time.sleep(0.2)
    assert orphan not in gpu.session_pids(proc.pid)
    assert gpu.outlive(proc.pid, wait_s=5.0)["settle_s"] < 1


def test_cores_used_between_two_samples_by_process_and_thread():
    """A thread's CPU seconds between the first sample inside the window and the last, per second;
    a thread first seen inside the window counts from zero; a window with one sample says nothing."""
    sampler = gpu.GpuSampler(root=0)
    worker, raylet = (101, 101), (202, 202)
    sampler.snapshots = [
        (9.0, {worker: ("ray::RayTrainWorker", "ray::RayTrainWo", 1.0)}),
        (10.0, {worker: ("ray::RayTrainWorker", "ray::RayTrainWo", 2.0)}),
        (12.0, {worker: ("ray::RayTrainWorker", "ray::RayTrainWo", 3.5), (101, 103): ("ray::RayTrainWorker", "pt_autograd_0", 0.5)}),
        (14.0, {worker: ("ray::RayTrainWorker", "ray::RayTrainWo", 4.0), (101, 103): ("ray::RayTrainWorker", "pt_autograd_0", 1.0),
                raylet: ("raylet", "raylet", 0.2)}),
        (20.0, {worker: ("ray::RayTrainWorker", "ray::RayTrainWo", 9.0)}),
    ]
    cores = sampler.cores_between(9.5, 15.0)  # samples at 10 and 14
    assert cores["window_s"] == 4.0
    assert cores["by_thread"] == {"ray::RayTrainWorker / ray::RayTrainWo": 0.5, "ray::RayTrainWorker / pt_autograd_0": 0.25,
                                  "raylet / raylet": 0.05}
    assert cores["by_process"] == {"ray::RayTrainWorker": 0.75, "raylet": 0.05}
    assert sampler.cores_between(10.5, 13.0) is None


def test_a_gpu_without_some_figures_is_described_not_crashed_on(tmp_path, monkeypatch):
    """nvidia-smi says [N/A] for utilisation on a MIG slice (and some virtual GPUs): the check records
    None there, before any mode runs, and the sampler keeps the memory it does report."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$1\" in *name*) echo 'NVIDIA H100 MIG 3g.40gb, 580.95, 12, 40192, [N/A]';; "
                   "*) echo '12, [N/A]';; esac\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    info = gpu.environment()
    assert (info["gpu"], info["gpu_used_mb_idle"], info["gpu_memory_mb"], info["gpu_util_idle"]) == (
        "NVIDIA H100 MIG 3g.40gb", 12.0, 40192.0, None)
    sampler = gpu.GpuSampler(root=os.getpid())
    sampler.sample()
    assert sampler.gpu_util == [] and sampler.gpu_used_mb == [12.0]
