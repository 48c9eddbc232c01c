"""`ray job submit` entrypoint for the demo on a fresh cluster: make the synthetic catalogue, then train it.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/demo_data.py --out demo_data --workers 2 --epochs 1

Writes the catalogue (parquet tables, PNG images) and its config `<out>/demo.yaml` (text too when
the MiniLM tokenizer package is installed), then runs `raymtl train <out>/demo.yaml` with the other
flags: the same flags as jobs/train.py, which re-trains or resumes from that config later (it holds
--storage and --name). The tables name images by absolute path, so on a multi-node cluster --out
must be on storage every node mounts at the same path (and --storage on shared storage, as for
every run).
"""

import argparse
import sys

from raymtl.cli import main
from raymtl.data.synthetic import (
    DEFAULT_SIZES,
    DEMO_IMAGE_SIZE,
    make_catalogue,
    write_demo_config,
)


def task_rows(text: str) -> tuple[str, int]:
    task, _, rows = text.partition("=")
    return task, int(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_data", help="folder for the catalogue and demo.yaml")
    default_sizes = " ".join(f"{task}={rows}" for task, rows in DEFAULT_SIZES.items())
    parser.add_argument("--sizes", nargs="+", type=task_rows, metavar="TASK=ROWS",
                        help=f"tasks and their rows (default: {default_sizes})")
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE, help="pixels of the images and the model input")
    # Written into demo.yaml, not passed on: `jobs/train.py --config <out>/demo.yaml` then resumes the same run.
    parser.add_argument("--storage", default="~/raymtl_results", help="storage path or URI for checkpoints and logs")
    parser.add_argument("--name", default="demo", help="experiment name (same name = resume)")
    args, rest = parser.parse_known_args()
    catalogue = make_catalogue(args.out, seed=0, image_size=args.image_size, sizes=dict(args.sizes or DEFAULT_SIZES))
    config = write_demo_config(
        args.out, catalogue, storage_path=args.storage, name=args.name, data={"image_size": args.image_size}
    )
    print(f"[raymtl demo] catalogue and config written: {config}", flush=True)
    sys.exit(main(["train", str(config), *rest]))
