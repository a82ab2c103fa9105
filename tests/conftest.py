"""Shared fixtures: small real catalogs on disk, one local Ray for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.config import parse_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo_catalog.parquet"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def semid_cli(*args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """`semid ARGS...` in a process of its own, run from the repository root, its output
    captured; env: its environment (this process's by default)."""
    return subprocess.run([sys.executable, "-m", "semid_dist.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)


def ray_session_dir() -> str | None:
    """The folder of the newest Ray session started on this machine (Ray's default temp
    folder), None before any: a command that must start no Ray leaves it as it was."""
    latest = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray"), "session_latest")
    return os.path.realpath(latest) if latest.exists() else None


def cli_build(cfg_path: Path, *overrides: str, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`semid build --config cfg_path key=value...` (`semid_cli`)."""
    return semid_cli("build", "--config", str(cfg_path), *overrides, env=env, timeout=timeout)


def run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in a thread of its own, all let go at once (a barrier); returns their
    results in order, or raises the first error one of them raised."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as exc:  # raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def named_error(run: subprocess.CompletedProcess) -> str:
    """The one line a `semid` command that stopped on a named error ends with (status 2)."""
    assert run.returncode == 2, run.stderr[-2000:]
    return run.stderr.strip().splitlines()[-1]


def clustered(n: int, d: int, *, clusters: int = 24, seed: int = 0) -> np.ndarray:
    """(n, d) float32 points around `clusters` random centres, unequal cluster sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 3
    weights = rng.pareto(1.5, clusters) + 0.1
    labels = rng.choice(clusters, n, p=weights / weights.sum())
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32)


def write_catalog(path: Path, x: np.ndarray, *, ids=None, row_group_rows: int = 500,
                  files: int = 1, popularity: np.ndarray | None = None) -> str:
    """Write x as a Parquet catalog (item_id, embedding fixed_size_list, popularity: row
    number % 97 unless given)."""
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    popularity = np.arange(n, dtype=np.int64) % 97 if popularity is None else popularity
    path.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        lo, hi = bounds[f], bounds[f + 1]
        table = pa.table({
            "item_id": pa.array(ids[lo:hi]),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(x[lo:hi].ravel(), pa.float32()), d),
            "popularity": pa.array(popularity[lo:hi]),
        })
        pq.write_table(table, path / f"part-{f:03d}.parquet", row_group_size=row_group_rows)
    return str(path)


def small_config(catalog: str, root: str, **over):
    data = {
        "engine": "local", "seed": 7,
        "input": {"path": catalog},
        "output": {"root": root, "table": "sids"},
        "quantizer": {"layers": [16, 8, 8], "niter": 8},
        "fit": {"sample_size": 1500, "num_workers": 2},
        "encode": {"shard_rows": 500, "num_actors": 2},
    }
    for key, value in over.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(data)


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory) -> tuple[str, np.ndarray]:
    x = clustered(2400, 12, seed=1)
    path = write_catalog(tmp_path_factory.mktemp("cat") / "catalog", x, files=2)
    return path, x


@pytest.fixture(scope="module")
def ray_session():
    """One embedded Ray per test module that needs it (small object store, no dashboard).

    Module scope, not session: an idle Ray left running while a later module starts Spark's
    JVM on these 2 cores was seen to abort the test process (a failed internal check in
    Ray's GCS subscriber, exit status 1, no output), and it frees its workers' memory."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False,  # (a Ray of its own)
             object_store_memory=256 * 2**20, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


INC_N, INC_NEW, INC_CHANGED, INC_AGAIN = 2400, 300, 150, 300


@pytest.fixture(scope="session")
def incremental_catalogs(tmp_path_factory):
    """For incremental versions: the parent catalog (ids 0..INC_N-1, 4 files, so it has
    several data parts), a delta of INC_NEW new items and INC_CHANGED changed items (ids in
    the last parent file only), the union catalog a full re-encode would read, and that
    delta with INC_AGAIN unchanged items of that file sent again ("resent"; their ids
    "again")."""
    base = tmp_path_factory.mktemp("inc")
    x = clustered(INC_N, 12, seed=1)
    parent = write_catalog(base / "parent", x, files=4)
    rng = np.random.default_rng(5)
    changed_ids = np.sort(rng.choice(np.arange(3 * INC_N // 4, INC_N), INC_CHANGED,
                                     replace=False))
    new_x = clustered(INC_NEW, 12, seed=9)
    changed_x = x[changed_ids] + rng.normal(scale=1.5, size=(INC_CHANGED, 12)).astype(np.float32)
    delta_ids = np.concatenate([np.arange(10_000, 10_000 + INC_NEW), changed_ids])
    delta_x = np.concatenate([new_x, changed_x]).astype(np.float32)
    delta = write_catalog(base / "delta", delta_x, ids=delta_ids, files=1)
    union_x = x.copy()
    union_x[changed_ids] = changed_x
    union = write_catalog(base / "union", np.concatenate([union_x, new_x]),
                          ids=np.concatenate([np.arange(INC_N), delta_ids[:INC_NEW]]), files=2)
    again = np.sort(np.random.default_rng(11).choice(  # in the last parent file too
        np.setdiff1d(np.arange(3 * INC_N // 4, INC_N), changed_ids), INC_AGAIN, replace=False))
    resent = write_catalog(base / "resent", np.concatenate([delta_x, x[again]]),
                           ids=np.concatenate([delta_ids, again]), files=2)
    return {"parent": parent, "delta": delta, "union": union, "changed": changed_ids,
            "resent": resent, "again": again}


def incremental_on_engines(cats: dict, root: str, engine: str):
    """A parent built from cats["parent"], then the same incremental child from
    cats["resent"] (new, changed and unchanged items; `collisions.max_per_sid: 6`) on the
    local engine (its suffixes ranked and its overflow moved on the driver) and on `engine`
    past driver.gather_rows (200: by tasks in key and prefix ranges, around the carried
    parts' suffixes and the re-sent items keeping theirs) -> (store, parent, [local,
    other])."""
    from semid_dist.io.store import TableStore
    from semid_dist.pipeline import build

    def quiet(msg: str) -> None:
        pass

    cap = {"collisions__max_per_sid": 6, "collisions__candidates": 8}
    parent = build(small_config(cats["parent"], root, **cap), log=quiet)
    logs: list[str] = []
    children = [build(small_config(cats["resent"], root, engine=name,
                                   encode__from_version=parent.version_id,
                                   encode__incremental=True, **cap, **opts), log=log)
                for name, opts, log in (("local", {}, quiet),
                                        (engine, {"driver__gather_rows": 200}, logs.append))]
    assert any(m.startswith("collisions: ranking") and "of carried parts" in m for m in logs)
    assert any(m.startswith("collisions: moving the overflow of") for m in logs), logs
    return TableStore(root, "sids"), parent, children


def capacity_ranges_on_engines(catalog: str, root: str, engine: str) -> tuple:
    """Fitted codebooks, then the same `collisions.max_per_sid: 1` encode past
    driver.gather_rows (300: moves in prefix ranges) on the local engine and on `engine`
    -> (the two tables sorted by item_id, the two results, `engine`'s log)."""
    from semid_dist.io.store import TableStore
    from semid_dist.pipeline import build

    fitted = build(small_config(catalog, root), log=lambda m: None)
    over = {"encode__from_version": fitted.version_id, "driver__gather_rows": 300,
            "collisions__max_per_sid": 1, "collisions__candidates": 8}
    logs: list[str] = []
    results = [build(small_config(catalog, root, engine=name, **over), log=log)
               for name, log in (("local", lambda m: None), (engine, logs.append))]
    store = TableStore(root, "sids")
    tables = [store.read_data(r.version_id).sort_by("item_id") for r in results]
    assert any("collisions: moving the overflow of" in m and "prefix ranges" in m for m in logs)
    assert results[0].metrics["collisions"]["reassigned"] > 0
    return tables, results, logs


def corrupt_embedding_pages(path, x: np.ndarray) -> None:
    """Write x as a catalog file with page checksums, then flip bytes inside the embedding
    column's pages (the footer and the id column stay valid)."""
    pq.write_table(pa.table({"item_id": pa.array(np.arange(600, 600 + len(x))),
                             "embedding": pa.FixedSizeListArray.from_arrays(
                                 pa.array(x.ravel(), pa.float32()), x.shape[1]),
                             "popularity": pa.array(np.zeros(len(x), np.int64))}),
                   path, compression="zstd", write_page_checksum=True)
    col = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = min(o for o in (col.dictionary_page_offset, col.data_page_offset) if o is not None)
    data = bytearray(path.read_bytes())
    middle = start + col.total_compressed_size // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
