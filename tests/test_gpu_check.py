"""benchmarks/gpu.py keeps working: its tiny CPU configuration, the bare loop, a raymtl run trained
in the process and `raymtl predict` over its model (the Train-worker and streamed modes share the
in-process mode's code and are left out for time)."""

import json

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
