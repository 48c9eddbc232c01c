"""What a sweep's trial reserves and how many the cluster holds (no Ray here; the packing itself in test_sweep)."""

import dataclasses

import pytest

from raymtl.config import ConfigError, Experiment, TaskSpec, TrainingSpec
from raymtl.tune.spec import SweepSpec
from raymtl.tune.resources import (
    TRIAL_DRIVER_CPUS,
    concurrency,
    trains_in_trial,
    trial_bundles,
    tune_resources,
    with_trial_gpus,
)


def exp_with(storage_path: str = "/tmp/runs", **training) -> Experiment:
    return Experiment(name="r", tasks=[TaskSpec("color", train="x.parquet", image_column="image")],
                      storage_path=storage_path, training=TrainingSpec(**training)).validate()


GPU_NODE = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}


def test_a_one_worker_trial_reserves_its_worker_and_a_quarter_gpu_packs_four():
    exp = with_trial_gpus(exp_with(cpus_per_worker=2), 0.25)
    assert trains_in_trial(exp) and exp.training.use_gpu
    assert tune_resources(exp) == trial_bundles(exp)[0] == {"CPU": 2.0, "GPU": 0.25}
    assert concurrency(trial_bundles(exp), [GPU_NODE]) == 4  # the GPU bounds it: 4 x 0.25
    assert concurrency(trial_bundles(exp), [GPU_NODE, GPU_NODE]) == 8  # grows with the cluster
    assert concurrency(trial_bundles(exp_with()), [{"CPU": 4.0}]) == 3  # CPU-only: one CPU stays for Ray Data


def test_a_train_run_trial_reserves_its_driver_and_counts_its_workers():
    exp = with_trial_gpus(exp_with(num_workers=2), 2.0)
    assert not trains_in_trial(exp) and not trains_in_trial(exp_with("s3://bucket/runs"))
    assert tune_resources(exp) == {"CPU": TRIAL_DRIVER_CPUS}
    assert exp.training.worker_resources == {"GPU": 1.0}  # one trial's GPUs split over its two workers
    assert trial_bundles(exp)[1:] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert concurrency(trial_bundles(exp), [{"CPU": 8.0, "GPU": 4.0}]) == 2  # the GPUs bound it: 4 / 2 per trial
    assert concurrency(trial_bundles(exp), [{"CPU": 8.0, "GPU": 8.0}]) == 3  # then the CPUs: 7 spare / 2.25


def test_a_trial_of_several_workers_gets_whole_gpus_per_worker():
    """NCCL runs one rank per GPU, and Ray fills one GPU with fractional requests: 0.5 GPU per worker
    would put a trial's two ranks on one GPU. Refused with the config, before any data is read."""
    two = exp_with(num_workers=2)
    for gpus in (1.0, 3.0, 0.5):
        with pytest.raises(ConfigError, match=rf"sweep.gpus_per_trial \({gpus:g} over a trial's 2 workers\): "
                                              rf"{gpus / 2:g} GPU per worker.*whole number of GPUs per worker"):
            SweepSpec(gpus_per_trial=gpus).validate(two)
    SweepSpec(gpus_per_trial=4.0).validate(two)  # two GPUs each
    SweepSpec(gpus_per_trial=0.25).validate(exp_with())  # one-worker trials share GPUs
    with pytest.raises(ConfigError, match=r"training.worker_resources.GPU: 0.5 GPU per worker with up to 4 workers"):
        exp_with(num_workers=[2, 4], use_gpu=True, worker_resources={"GPU": 0.5})
    exp_with(num_workers=1, use_gpu=True, worker_resources={"GPU": 0.5})


def test_a_trial_that_can_never_fit_is_an_error_before_tune_starts():
    with pytest.raises(ConfigError, match=r"a trial needs 1 CPU, 2 GPU on one node.*largest: 16 CPU, 1 GPU"):
        concurrency(trial_bundles(with_trial_gpus(exp_with(), 2.0)), [GPU_NODE])
    with pytest.raises(ConfigError, match="a trial needs 1 CPU, 1 GPU on one node"):
        concurrency(trial_bundles(with_trial_gpus(exp_with(), 1.0)), [{"CPU": 8.0}])  # no GPU at all
    four = dataclasses.replace(exp_with(num_workers=4), training=TrainingSpec(num_workers=4, cpus_per_worker=2))
    with pytest.raises(ConfigError, match=r"a trial needs 8.25 CPU in all and the cluster has 4 CPU"):
        concurrency(trial_bundles(four), [{"CPU": 4.0}])


PACKING = """
import json, sys, time
import ray
from ray import tune
from raymtl.config import Experiment, TaskSpec
from raymtl.tune.resources import cluster_nodes, concurrency, trial_bundles, tune_resources, with_trial_gpus

ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, logging_level="ERROR")
exp = with_trial_gpus(Experiment(name="r", tasks=[TaskSpec("c", train="x.parquet", image_column="image")],
                                 storage_path=sys.argv[1]).validate(), 0.25)

def trial(config):
    start = time.time()
    time.sleep(4)
    tune.report({"start": start, "end": time.time(), "gpus": ",".join(map(str, ray.get_gpu_ids()))})

grid = tune.Tuner(
    tune.with_resources(trial, tune_resources(exp)),
    param_space={"i": tune.grid_search(list(range(8)))},
    tune_config=tune.TuneConfig(max_concurrent_trials=8),  # only the resources hold trials back
    run_config=tune.RunConfig(storage_path=sys.argv[1], name="packing", verbose=0),
).fit()
spans = [(r.metrics["start"], r.metrics["end"]) for r in grid]
overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
print(json.dumps({"fits": concurrency(trial_bundles(exp), cluster_nodes()), "overlap": overlap,
                  "gpus": sorted({r.metrics["gpus"] for r in grid}), "errors": sum(r.error is not None for r in grid)}))
"""


@pytest.mark.slow
def test_quarter_gpu_trials_pack_four_on_one_simulated_gpu(tmp_path):
    """A local cluster with one (simulated) GPU: Tune runs exactly four 0.25-GPU trials at once, all on GPU 0."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", PACKING, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"fits": 4, "overlap": 4, "gpus": ["0"], "errors": 0}
