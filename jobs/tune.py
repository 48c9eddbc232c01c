"""`ray job submit` entrypoint for sweeps: the same code path as `raymtl tune`.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py --config jobs/configs/sweep.yaml --max-concurrent 4
"""

import argparse
import sys

from raymtl.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML with a `sweep:` section")
    args, rest = parser.parse_known_args()
    sys.exit(main(["tune", args.config, *rest]))
