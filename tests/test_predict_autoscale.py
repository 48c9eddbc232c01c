"""The model-actor pool of a prediction run grows onto a node that joins mid-run.

Two Ray nodes of this box (`ray.cluster_utils.Cluster`): model actors ask for a custom resource
(`resources_per_actor`) of which the head offers one, so the pool (`pool_size=1, max_pool_size=2`)
starts one actor there. Each batch is one item and the model stage sleeps per batch, so items queue
behind it; after the first predictions are out, a node with one more slot joins, and the pool's
second actor starts on it and takes batches. Every item still comes out exactly once. It runs in a
subprocess: the session's own Ray cluster stays untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raymtl.data.synthetic import make_catalogue

from test_predict import model_dir  # noqa: F401 (the fixture: the small saved model)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[1]
SLOT = {"model_slot": 1}
ITEMS, JOIN_AFTER, SECONDS_PER_BATCH = 40, 3, 0.5


def main(model: str, items: str, out: str) -> None:
    import numpy as np
    import pyarrow as pa
    import ray
    from ray.cluster_utils import Cluster

    import raymtl
    from raymtl.predict import predictions
    from raymtl.predict.actors import Predict
    from raymtl.predict.plan import make_plan
    from raymtl.predict.reading import read_items

    class Recording(Predict):
        """`Predict`, slowed per batch, with the process and node of the actor on every row."""

        def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
            time.sleep(SECONDS_PER_BATCH)
            table = super().__call__(batch)
            rows = table.num_rows
            return table.append_column("pid", pa.array([os.getpid()] * rows, pa.int64())).append_column(
                "node", pa.array([ray.get_runtime_context().get_node_id()] * rows, pa.string()))

    store = 128 * 2**20
    # 3 CPUs: one decoding actor (CPUs - model actors - 1), the model actor, the read tasks.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "resources": SLOT, "object_store_memory": store, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        plan = make_plan(model, raymtl.load(model), tasks=["pattern"])
        stage = predictions(read_items(items, plan), plan, batch_size=1, pool_size=1, gpus=0.0, model_stage=Recording,
                            max_pool_size=2, resources=SLOT, rows=ITEMS)
        rows, joined = [], None
        # Ray starts a node from the main thread only: the run is consumed here, the node added in between.
        for row in stage.iter_rows():
            rows.append({key: row[key] for key in ("id", "pattern", "pid", "node")} | {"t": time.time()})
            if len(rows) == JOIN_AFTER:
                joined = cluster.add_node(num_cpus=2, resources=SLOT, object_store_memory=store).node_id
                added = time.time()
        head = cluster.head_node.node_id
        Path(out).write_text(json.dumps({"rows": rows, "head": head, "joined": joined, "added": added}))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def items_file(tmp_path) -> str:
    frame = pd.read_parquet(make_catalogue(tmp_path, image_size=32, sizes={"color": 2 * ITEMS})["color"]["train"])
    path = tmp_path / "items.parquet"
    assert len(frame) >= ITEMS
    frame.drop(columns="label").head(ITEMS).to_parquet(path)
    return str(path)


def test_the_model_pool_grows_onto_a_node_that_joins_and_every_item_is_predicted_once(model_dir, items_file,
                                                                                       tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, model_dir, items_file, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    rows = pd.DataFrame(result["rows"])
    assert len(rows) == ITEMS and sorted(rows.id) == sorted(pd.read_parquet(items_file).id)  # each item once
    assert rows.pattern.notna().all()
    actors = rows.groupby(["node", "pid"]).t.min().sort_values()  # each actor's first row, in order
    assert len(actors) == 2, actors
    (first_node, _), (second_node, _) = actors.index
    assert first_node == result["head"] and second_node == result["joined"] != result["head"]
    assert actors.iloc[1] > result["added"]  # the second actor's first row came after the node joined
    assert (rows.node == result["joined"]).sum() >= 2


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
