"""Seconds of `raymtl evaluate` on Ray Data's actors over several tasks: every task's rows in one
stream, against one evaluation per task (what `evaluate` did before the stream: a pipeline, and a
start of the decode and model actors, per task).

    python -m benchmarks.evaluate_tasks --rows 500 --out evaluate_tasks.json

The model is the demo's architecture (ResNet-18 over two 64 px views, a small BERT over titles with
the MiniLM tokenizer, four tasks), built untrained: the time does not depend on the weights. Both
ways run on the same local cluster (started first, not timed), `local=False`, and must give the
same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.predict_throughput import demo_model
from raymtl.data.datasets import FOOTER_ACTORS_ENV
from raymtl.evaluate import evaluate
from raymtl.ray_runtime import ensure_ray, release


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500, help="rows per task (train + validation)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternated")
    parser.add_argument("--out", default="evaluate_tasks.json")
    args = parser.parse_args()

    import ray.data

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exp, model, _ = demo_model(root, dict.fromkeys(("color", "pattern", "season", "style"), args.rows))
        ensure_ray()  # the local cluster `raymtl evaluate` starts: one CPU slot per core, at least 4
        ray.data.DataContext.get_current().enable_progress_bars = False
        stream_s, per_task_s = [], []
        for _ in range(args.repeats):  # alternated: the first run of either pays the cluster's warm-up
            start = time.perf_counter()
            stream = evaluate(model, exp, batch_size=args.batch_size, local=False)
            stream_s.append(time.perf_counter() - start)
            per_task, start = {}, time.perf_counter()
            for task in exp.task_names:
                per_task.update(evaluate(model, exp, tasks=[task], batch_size=args.batch_size, local=False).tasks)
            per_task_s.append(time.perf_counter() - start)
        release()
    differ = max(abs(per_task[t][m] - v) for t, metrics in stream.tasks.items() for m, v in metrics.items())
    if differ > 1e-6:
        raise RuntimeError(f"the two ways disagree: by {differ}")
    rows = {task: metrics["rows"] for task, metrics in stream.tasks.items()}
    result = {"tasks": len(rows), "validation_rows": rows, "batch_size": args.batch_size, "cpus": os.cpu_count(),
              "machine": platform.machine(), "footer_actors_env": os.environ.get(FOOTER_ACTORS_ENV), "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0],
              "largest_metric_difference": differ, "one_stream_s": stream_s, "a_pipeline_per_task_s": per_task_s}
    print(f"{len(rows)} tasks, validation rows {rows}: one stream {', '.join(f'{s:.1f}' for s in stream_s)} s, "
          f"a pipeline per task {', '.join(f'{s:.1f}' for s in per_task_s)} s")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
