"""A large task split's raw columns as Ray Data read them: blocks in the object store, never in the driver.

The driver only holds the blocks' object refs and where each block starts; a decode task fetches the
blocks its rows fall in (zero-copy from the object store, once per process) and takes the rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from raymtl.data.tables import concat_files, to_pandas


@dataclass
class SourceBlocks:
    """Rows [starts[i], starts[i + 1]) of a task split are block i (an Arrow table in the object store)."""

    blocks: list[ray.ObjectRef | pa.Table]
    starts: np.ndarray  # len(blocks) + 1 row offsets

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @classmethod
    def read(cls, parts: list[ray.data.Dataset]) -> SourceBlocks:
        """`parts` (column-pruned reads whose rows, one after the other, are the split's rows) executed
        on the cluster, each once, kept as their blocks in that order."""
        refs = []
        for ds in parts:
            # row i of the split must be row i of its files in order, as inspection counted them; a
            # Dataset runs under the context it was made with, so the order is asked of `ds` itself
            ds.context.execution_options.preserve_order = True
            refs += ds.materialize().to_arrow_refs()
        rows = ray.get([_num_rows.remote(ref) for ref in refs])
        return cls(refs, np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))

    def take(self, rows: np.ndarray) -> pd.DataFrame:
        """The rows `rows` (indices into the whole split), in that order."""
        rows = np.asarray(rows, np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        parts, order = [], []
        for b in np.unique(which):
            mine = np.flatnonzero(which == b)
            parts.append(to_pandas(_block(self.blocks[b]).take(pa.array(rows[mine] - self.starts[b]))))
            order.append(mine)
        frame = concat_files(parts)  # blocks of different files may type a column differently
        return frame.iloc[np.argsort(np.concatenate(order), kind="stable")].reset_index(drop=True)

    def owned(self, copy) -> SourceBlocks:
        """These blocks copied by `copy` (into this process's memory)."""
        return SourceBlocks([copy(b) for b in self.blocks], self.starts)


@ray.remote(num_cpus=0)
def _num_rows(block: pa.Table) -> int:
    return block.num_rows


def _block(ref: ray.ObjectRef | pa.Table) -> pa.Table:
    return ref if isinstance(ref, pa.Table) else _fetched(ref)


@functools.lru_cache(maxsize=256)
def _fetched(ref: ray.ObjectRef) -> pa.Table:
    return ray.get(ref)
