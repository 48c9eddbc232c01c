"""An elastic run on two Ray nodes of this box: `num_workers: [1, 2]` loses a node mid-epoch and
regains it, and every row of every epoch is still trained on exactly once.

The second node is first told it will be preempted (a drain with Ray's preemption reason, as a spot
reclaim notice): the workers checkpoint at once. Then its raylet is removed: Ray Train restarts the
group on the one node left (a preemption: it does not count against `max_failures: 0`), and the run
continues on 1 worker from that checkpoint. When a node is added back, Ray Train's elastic policy
grows the group to 2 workers again, from the latest checkpoint. Each worker logs the rows of every
step (`elastic.ROWS_ENV`); steps after the checkpoint a group resumed from are redone, and the
counting drops them. It runs in a subprocess: the session's own Ray cluster stays untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
SLOT = {"train_slot": 1}


def logged_steps(folder: Path) -> list[dict]:
    """The steps logged so far (a line being written is left for the next look)."""
    steps = []
    for line in (line for f in folder.glob("rows-*.jsonl") for line in f.read_text().splitlines()):
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [step for step in steps if "rows" in step]


def wait_for(what, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not what():
        if time.time() > end:
            raise TimeoutError("the run did not get there in time")
        time.sleep(0.2)


def look_at_the_cluster_every_second() -> None:
    """Ray Train's elastic policy grows a group from the reservations of Ray Data's autoscaling
    coordinator, which looks at the cluster every 20 s: a returned node was seen 1-20 s late, and the
    run had to last long enough for that. The coordinator is an actor of this job: every 1 s here."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor

    _AutoscalingCoordinatorActor.TICK_INTERVAL_S = 1


def main(config: str, rows: str, out: str) -> None:
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # the controller's watcher of node drains
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
    os.environ["RAYMTL_TEST_ROW_LOG"] = rows
    # A node that vanishes is found dead in ~1.5 s, not ~15 s.
    os.environ.update(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                      RAY_health_check_failure_threshold="3")
    # Ray Train restarts a group at the size the reservations say, and they still count a node that
    # died within a second or two: looking at the workers at Ray's default pace (2 s, not the suite's
    # 0.5) leaves that time, and a group that cannot start is given up after 30 s, not 60.
    os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "30"
    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from raymtl.config import load_experiment
    from raymtl.train.trainer import fit

    store = 256 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "resources": SLOT, "object_store_memory": store, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2, resources=SLOT, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": look_at_the_cluster_every_second})
    timeline: list[str] = []

    def spot_node() -> None:
        try:
            reclaim_and_return()
        except Exception as error:  # the assertion on the timeline shows it
            timeline.append(repr(error))

    def reclaim_and_return() -> None:
        """The second node: reclaim notice (4 s ahead) at global step 5, gone just after the deadline,
        back after 4 steps on 1 worker. Ray Train (given a grace past the deadline) restarts the
        group once its ranks have stopped, counting a preemption, not a failure: Ray marks a
        drained node that dies after its deadline as preempted."""
        wait_for(lambda: any(s["g"] >= 5 for s in logged_steps(Path(rows))))
        gcs = ray._raylet.GcsClient(address=cluster.address)
        accepted, _ = gcs.drain_node(second.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                     "spot reclaim (test)", int(time.time() * 1000) + 4_000)
        timeline.append(f"drain accepted={accepted}")
        time.sleep(4.5)
        cluster.remove_node(second, allow_graceful=False)  # gone after its deadline, as a reclaimed spot node goes
        timeline.append("removed")
        wait_for(lambda: sum(s["world"] == 1 for s in logged_steps(Path(rows))) >= 4)
        cluster.add_node(num_cpus=2, resources=SLOT, object_store_memory=store)
        timeline.append("added")

    try:
        exp = load_experiment(config)
        training = dataclasses.replace(
            exp.training, num_workers=[1, 2], epochs=2, checkpoint_every_steps=4, worker_resources=SLOT,
            max_failures=0, collective_timeout_s=60, preemption_check_steps=1, elastic_resize_interval_s=1.0,
            preemption_grace_s=20.0)
        exp = dataclasses.replace(exp, name="elastic", training=training)
        # Ray starts a node from the main thread only: the run trains in another one.
        outcome: dict = {}
        run = threading.Thread(target=lambda: outcome.update(result=fit(exp)), daemon=True)
        run.start()
        spot_node()
        run.join()
        result = outcome["result"]
        Path(out).write_text(json.dumps({"timeline": timeline, "history": result.history, "events": result.events}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_an_elastic_run_loses_a_node_and_regains_it_reading_every_row_once(tmp_path):
    from rows import kept_steps, rows_read
    from test_training import catalogue

    config = catalogue(tmp_path, {"color": 320, "style": 320})
    rows, out = tmp_path / "rows", tmp_path / "result.json"
    rows.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(config), str(rows), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["timeline"] == ["drain accepted=True", "removed", "added"]
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    events = result["events"]
    notice = [e for e in events if e["event"] == "preemption"]
    resizes = [(e["old_world"], e["world"]) for e in events if e["event"] == "resize"]
    assert len(notice) == 1 and resizes == [(2, 1), (1, 2)]
    shrink = next(e for e in events if e["event"] == "resize")
    assert shrink["global_step"] >= notice[0]["global_step"]  # continued from the notice's checkpoint or a later one
    steps = kept_steps(rows)
    assert {s["world"] for s in steps} == {1, 2}
    read = rows_read(steps)
    assert sorted(read) == [(e, t) for e in range(2) for t in ("color", "style")]
    assert all(counts == Counter(range(256)) for counts in read.values())  # every row once, every epoch


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
