"""`ray job submit` entrypoint for sweeps: the same code path as `raymtl tune`.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py --config jobs/configs/catalogue.yaml --workers 1 --gpu --max-concurrent 4

The config is an experiment with a `sweep:` section (jobs/configs/catalogue.yaml has the grouping
search). Exits 1 when every trial failed or none reported the sweep metric, so the Ray job fails
too (Tune itself does not raise); re-submitting resumes the sweep.
"""

import argparse
import sys

from raymtl.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML with a `sweep:` section")
    args, rest = parser.parse_known_args()
    sys.exit(main(["tune", args.config, *rest]))
