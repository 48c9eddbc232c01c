"""`benchmarks/comm_ddp.py` at a tiny size: every mode timed, runs appended to the JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import comm_ddp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_every_mode_is_timed_and_runs_are_appended(tmp_path):
    out = tmp_path / "comm_ddp.json"
    argv = ["--steps", "8", "--batch-size", "2", "--image-size", "16", "--warmup", "0", "--json", str(out)]
    first = comm_ddp.main(argv)
    assert first["steps_per_mode"] == dict.fromkeys(comm_ddp.MODES, 2)
    assert all(first["step_s"][m] > 0 and first["cpu_s_per_step"][m] > 0 for m in comm_ddp.MODES)
    assert first["exposed_comm_s"]["ddp"] == pytest.approx(first["step_s"]["ddp"] - first["step_s"]["off"])
    comm_ddp.main(argv)
    assert len(json.loads(out.read_text())["runs"]) == 2
