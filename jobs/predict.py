"""`ray job submit` entrypoint for batch prediction: the same code path as `raymtl predict`.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/predict.py --model s3://bucket/runs/demo/checkpoint_000003 \
            --input s3://bucket/catalogue/items/ --output s3://bucket/predictions/demo/ --pool-size 4 --top-k 3

Every other flag is `raymtl predict`'s (--tasks, --batch-size, --strict, --num-gpus, ...). The model,
the items and their images must be readable from every node: URIs, or shared storage.
"""

import argparse
import sys

from raymtl.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder or URI")
    parser.add_argument("--input", required=True, help="items: parquet/CSV path, glob or URI, or a folder of images")
    parser.add_argument("--output", required=True, help="parquet output folder or URI")
    args, rest = parser.parse_known_args()
    sys.exit(main(["predict", args.model, args.input, args.output, *rest]))
