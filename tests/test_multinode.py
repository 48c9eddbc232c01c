"""Two Ray nodes on this box (a head and a second raylet): one training worker on each, to the end.

Each node offers one `train_slot` resource and each of the 2 workers asks for one, so Ray must place
them on different nodes. Storage is a local folder both raylets see (on a real cluster: shared
storage or a URI). The run is interrupted once (a worker crash, no retries) and resumed under the
same name. It runs in a subprocess: the test session's own local Ray cluster stays untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]


def main(config: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from raymtl.config import load_experiment
    from raymtl.train.faults import CRASH_ENV
    from raymtl.train.trainer import fit

    store = 256 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "resources": {"train_slot": 1}, "object_store_memory": store, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"train_slot": 1}, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        exp = load_experiment(config)
        training = dataclasses.replace(
            exp.training, num_workers=2, epochs=2, checkpoint_every_steps=3, worker_resources={"train_slot": 1},
            max_failures=0, collective_timeout_s=120)
        exp = dataclasses.replace(exp, name="two-nodes", tasks=[t for t in exp.tasks if t.name == "color"],
                                  training=training)
        os.environ[CRASH_ENV] = "7"
        failed = fit(exp, raise_on_error=False)
        del os.environ[CRASH_ENV]
        resumed = fit(exp)
        Path(out).write_text(json.dumps({
            "slots": [n["Resources"].get("train_slot") for n in nodes],
            "failed": failed.error is not None,
            "failed_epochs": len(failed.history),
            "history": resumed.history,
            "checkpoint": resumed.checkpoint,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_nodes_train_checkpoint_and_resume(tmp_path):
    from test_training import catalogue

    config = catalogue(tmp_path, {"color": 160})
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(config), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["slots"] == [1.0, 1.0]  # two nodes, one worker slot each: the 2 workers are on both
    assert result["failed"] and result["failed_epochs"] == 1  # crashed at step 7 of 2 x 4 (checkpoint at step 6)
    # per rank: (128 rows // 2 workers) // 16 = 4 batches of one task per epoch
    assert [(row["epoch"], row["global_step"]) for row in result["history"]] == [(1, 4), (2, 8)]
    assert json.loads((Path(result["checkpoint"]) / "run.json").read_text())["schedule"]["world_size"] == 2


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
