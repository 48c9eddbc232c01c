"""Memory of ranks reading the decoded cache: one copy per node, whatever the ranks on it.

    python -m benchmarks.cache_sharing --rows 1024 --ranks 1 2 4 --json benchmarks/results/cache_sharing.json

A decoded cache of `rows` items of two 224 px views (uint8, as `Preprocessor` decodes them; 128 rows
per chunk) goes into the object store as `Decoded` chunks. R ranks (Ray actors on this node, as
Train workers are) each build a `DecodedCache` of it and read every row, as the epochs' gathered
batches do, with `zero-copy` (how ranks read it) and `private copies` (each rank copying every chunk
into its own heap, as unpickling every chunk did before). Measured per rank, from
/proc/self/smaps_rollup: USS growth (private memory) and PSS growth (shared pages split among the
processes mapping them); the node's cost of the ranks is their summed PSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import ray
import ray.cloudpickle

from raymtl.data.datasets import Decoded, DecodedCache

# Ray's workers get this module's code by value: they need not import the benchmarks folder.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
VIEW = (224, 224, 3)
CHUNK_ROWS = 128


def memory() -> dict[str, int]:
    fields = dict(line.split(":") for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    kb = {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
    return {"uss": kb["Private_Clean"] + kb["Private_Dirty"], "pss": kb["Pss"]}


@ray.remote(num_cpus=0)
class Rank:
    def read(self, chunks: list, copy: bool) -> dict[str, int]:
        before = memory()
        cache = DecodedCache(chunks)
        self.held = [d.owned() if copy else d for parts in cache.parts.values() for d in parts]
        self.checksum = sum(int(a.sum()) for d in self.held for a in d.arrays.values())  # touch every page
        return before

    def grown(self, before: dict[str, int]) -> dict[str, int]:
        now = memory()
        return {k: now[k] - before[k] for k in now}


def make_chunks(rows: int, shapes: dict[str, tuple[int, ...]], chunk_rows: int = CHUNK_ROWS) -> tuple[list, int]:
    """A decoded cache of `rows` random uint8 rows per column shape, in the object store; and its bytes."""
    rng = np.random.default_rng(0)
    chunks = [("t.train", start, ray.put(Decoded({
        **{name: rng.integers(0, 256, (chunk_rows, *shape), dtype=np.uint8) for name, shape in shapes.items()},
        "label": np.zeros(chunk_rows, np.int64)})))
        for start in range(0, rows, chunk_rows)]
    return chunks, len(chunks) * chunk_rows * (sum(int(np.prod(s)) for s in shapes.values()) + 8)


def run(chunks: list, ranks: int, copy: bool) -> list[dict[str, int]]:
    """Each rank's memory growth once all `ranks` have read the cache (zero-copy, or `copy`)."""
    actors = [Rank.remote() for _ in range(ranks)]
    befores = [ray.get(a.read.remote(chunks, copy)) for a in actors]  # one after another, as ranks start
    grown = ray.get([a.grown.remote(b) for a, b in zip(actors, befores)])  # all of them still holding it
    for a in actors:
        ray.kill(a)
    return grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    chunks, nbytes = make_chunks(args.rows, {"view_full": VIEW, "view_crop": VIEW})
    per_item = nbytes // args.rows
    cache_mb = nbytes / 2**20
    results = []
    for copy in (False, True):
        for ranks in args.ranks:
            grown = run(chunks, ranks, copy)
            row = {"mode": "private copies" if copy else "zero-copy", "ranks": ranks,
                   "uss_mb_per_rank": [round(g["uss"] / 2**20, 1) for g in grown],
                   "pss_mb_sum": round(sum(g["pss"] for g in grown) / 2**20, 1)}
            results.append(row)
            print(f"{row['mode']:>15}  ranks={ranks}  USS growth per rank (MB) {row['uss_mb_per_rank']}  "
                  f"summed PSS growth {row['pss_mb_sum']} MB  (cache {cache_mb:.0f} MB)")
    out = {"rows": args.rows, "bytes_per_item_uint8": per_item, "bytes_per_item_float32_before": 4 * 2 * int(np.prod(VIEW)) + 8,
           "cache_mb": round(cache_mb, 1), "results": results,
           "load": {"before": load_before, "after": os.getloadavg()[0]}, "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
