"""Arguments shared by the tasks of one engine `map` are shipped once and put back intact."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

from semid_dist.engines.shared import Shared, resolve, split_shared


def test_objects_in_several_items_are_shipped_once_and_restored():
    table = pa.table({"k": np.arange(100_000)})
    ctx = {"version": "v1"}
    items = [(ctx, i, table, None) for i in range(50)]
    shared, light = split_shared(items)
    assert len(shared) == 2 and shared[0] is ctx and shared[1] is table
    assert all(item[0] == Shared(0) and item[2] == Shared(1) and item[3] is None
               for item in light)
    assert [i[1] for i in light] == list(range(50))  # per-item arguments stay in place
    # what travels per task is tiny; the table goes once
    per_task = max(len(pickle.dumps(i)) for i in light)
    assert per_task < 200 < len(pickle.dumps(table))
    for original, item in zip(items, light):
        got = resolve(item, shared)
        assert got[0] is ctx and got[2] is table and got[1] == original[1] and got[3] is None


def test_no_sharing_leaves_items_as_they_are():
    items = [(np.arange(3), "a"), (np.arange(3), "b")]
    shared, light = split_shared(items)
    assert shared == [] and light == items
