"""`ray job submit` entrypoint for training: the same code path as `raymtl train`.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config jobs/configs/catalogue.yaml --workers 4 --gpu
"""

import argparse
import sys

from raymtl.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML")
    args, rest = parser.parse_known_args()
    sys.exit(main(["train", args.config, *rest]))
