"""Deterministic collision suffixes: inside each identical SID, items are ranked by
reconstruction error, then item id; the rank is the suffix, so (sid, suffix) is unique."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def colliding_keys(sid_keys: np.ndarray, sid_counts: np.ndarray) -> np.ndarray:
    """Keys of SIDs held by more than one item (sorted int64)."""
    return sid_keys[sid_counts > 1]


def assign_suffixes(keys: np.ndarray, qerr: np.ndarray, item_ids: pa.Array) -> np.ndarray:
    """keys: (n,) int64 SID keys, qerr: (n,) float32, item_ids: n ids -> (n,) int32 suffixes,
    the rank of each item inside its key by (qerr, item_id)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int32)
    t = pa.table({"k": keys, "e": qerr, "i": item_ids})
    order = pc.sort_indices(t, sort_keys=[("k", "ascending"), ("e", "ascending"),
                                          ("i", "ascending")]).to_numpy()
    sorted_keys = keys[order]
    first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    suffix = np.empty(len(keys), dtype=np.int32)
    suffix[order] = np.arange(len(order)) - group_start
    return suffix
