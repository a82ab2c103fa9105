"""Arguments shared by the tasks of one engine `map` are shipped once and put back intact."""

from __future__ import annotations

import os
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


def test_embedded_ray_workers_keep_the_storage_clients_info_lines_off_the_console():
    """Each Ray Train worker reading s3:// logged `Found credentials in environment
    variables.` and `Found endpoint for s3 via: ...` (aiobotocore's and botocore's INFO
    lines) among the build's progress; the workers' set-up keeps their warnings only."""
    import logging

    from semid_dist.engines import ray_worker_setup

    names = ("aiobotocore.credentials", "botocore.credentials", "botocore.endpoint")
    before = {n: logging.getLogger(n).level
              for n in ("", *ray_worker_setup.STORAGE_CLIENT_LOGGERS)}
    address = os.environ.get("RAY_ADDRESS")  # (a Ray this process runs: the set-up names it)
    try:
        logging.getLogger().setLevel(logging.INFO)  # as a Ray worker's logging is
        ray_worker_setup.set_up_worker()
        assert all(not logging.getLogger(n).isEnabledFor(logging.INFO) for n in names)
        assert all(logging.getLogger(n).isEnabledFor(logging.WARNING) for n in names)
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)
        os.environ.pop("RAY_ADDRESS", None)
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


def test_the_embedded_rays_worker_hook_names_the_set_up():
    """The raylet's environment names the set-up by its dotted path (a string: a rename
    that missed it would leave the workers without it, silently)."""
    import importlib

    from semid_dist.engines import ray_session, ray_worker_setup

    module, name = ray_session.WORKER_SETUP.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is ray_worker_setup.set_up_worker
