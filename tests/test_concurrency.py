"""Concurrent commits: `_latest` only moves forward (compare-and-swap under a lock), every
manifest stays intact, no temporary or lock files are left behind."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from semid_dist.errors import StoreError
from semid_dist.io import locks
from semid_dist.io.store import LATEST_LOCK, MANIFEST, TableStore, new_version_id
from semid_dist.pipeline import build
from tests.conftest import REPO, run_together, small_config
from tests.test_store import write_version

T0 = dt.datetime(2026, 5, 1, 0, 0, 0, tzinfo=dt.timezone.utc)


def quiet(msg: str) -> None:
    pass


def vid_at(seconds: float) -> str:
    return new_version_id(T0 + dt.timedelta(seconds=seconds))


@pytest.fixture()
def slow_latest_write(monkeypatch):
    """Widen the read-compare-write window so that a missing lock would show."""
    real = TableStore._write_latest

    def slow(self, version_id: str) -> None:
        time.sleep(random.uniform(0.0, 0.004))
        real(self, version_id)

    monkeypatch.setattr(TableStore, "_write_latest", slow)


def assert_store_is_clean(store: TableStore, base: Path | None) -> None:
    committed = store.versions()
    assert store.latest() == max(committed)
    for v in committed:  # every manifest is complete, valid JSON
        m = json.loads(store.read_bytes(v, MANIFEST))
        assert m["version_id"] == v and m["rows"]["encoded"] == 50
    if base is not None:
        leftovers = [p.name for p in base.rglob("*") if ".tmp-" in p.name or "lock" in p.name]
        assert leftovers == []


def commit_together(staged: list[tuple]) -> dict[str, bool]:
    """Commit (store, version id, manifest, files) tuples from one thread each, released
    together -> {version id: whether `_latest` moved}."""
    barrier = threading.Barrier(len(staged))
    moved: dict[str, bool] = {}
    errors: list[BaseException] = []

    def commit(store: TableStore, v: str, man: dict, files: list) -> None:
        try:
            barrier.wait()
            moved[v] = store.commit(v, man, files)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=s) for s in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return moved


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_two_threads_committing_keep_latest_on_the_newest(tmp_path, kind, slow_latest_write):
    if kind == "local":
        root, base = str(tmp_path / "r"), tmp_path / "r"
    else:
        root, base = f"memory://conc-{uuid.uuid4().hex[:8]}", None
    rng = random.Random(0)
    for rnd in range(20):
        # ids a few seconds apart in random order: sometimes the newer one commits first
        ids = [vid_at(rnd * 100 + rng.uniform(0, 5)) for _ in range(2)]
        staged = []
        for v in ids:
            store = TableStore(root, "sids")  # one handle per "build", as in real life
            files, man = write_version(store, v)
            staged.append((store, v, man, files))
        moved = commit_together(staged)
        newest = max(ids)
        assert moved[newest] is True  # the newest of a round always lands
        assert TableStore(root, "sids").latest() == newest
    store = TableStore(root, "sids")
    assert len(store.versions()) == 40
    assert_store_is_clean(store, base)


def test_an_older_version_committing_late_leaves_latest_alone(tmp_path):
    store = TableStore(str(tmp_path / "r"), "sids")
    old, new = vid_at(0), vid_at(10)
    for v in (old, new):
        write_version(store, v)
    files_new, man_new = write_version(store, new)
    assert store.commit(new, man_new, files_new) is True
    files_old, man_old = write_version(store, old)
    assert store.commit(old, man_old, files_old) is False
    assert store.latest() == new and store.versions() == [old, new]
    assert store.manifest(old)["version_id"] == old  # still committed and readable


_CHILD = """
import sys
from semid_dist.io.store import TableStore
from tests.test_store import write_version
root, ids = sys.argv[1], sys.argv[2].split(",")
store = TableStore(root, "sids")
staged = [(v, *write_version(store, v)) for v in ids]
print("staged", flush=True)
sys.stdin.readline()  # start together
for v, files, man in staged:
    store.commit(v, man, files)
"""


def test_two_processes_committing_share_the_lock_file(tmp_path):
    root = str(tmp_path / "r")
    ids = sorted(vid_at(s + random.random()) for s in range(0, 200, 10))
    random.Random(1).shuffle(ids)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, root, ",".join(ids[i::2])],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:  # both have staged their versions before either commits
        assert p.stdout.readline() == "staged\n", p.stderr.read()[-2000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    store = TableStore(root, "sids")
    assert store.versions() == sorted(ids)
    assert_store_is_clean(store, tmp_path / "r")


def test_a_stale_lock_is_broken_and_a_live_one_times_out(tmp_path, monkeypatch):
    store = TableStore(str(tmp_path / "r"), "sids")
    lock = Path(store.base) / LATEST_LOCK
    lock.parent.mkdir(parents=True)
    lock.write_text("12345-dead")
    old = time.time() - locks.LOCK_STALE_S - 5
    os.utime(lock, (old, old))
    v1 = vid_at(0)
    files, man = write_version(store, v1)
    assert store.commit(v1, man, files) is True
    assert store.latest() == v1 and not lock.exists()
    assert not [p for p in lock.parent.iterdir() if "stale" in p.name]
    lock.write_text("67890-alive")  # a fresh lock: its holder is still committing
    monkeypatch.setattr(locks, "LOCK_TIMEOUT_S", 0.3)
    v2 = vid_at(10)
    files, man = write_version(store, v2)
    with pytest.raises(StoreError, match=rf"{v2} is committed, but _latest was not moved.*"
                                         rf"could not lock .*{LATEST_LOCK}"):
        store.commit(v2, man, files)
    assert store.latest() == v1 and lock.read_text() == "67890-alive"
    lock.unlink()
    assert store.advance_latest(v2) is True and store.latest() == v2


def test_two_concurrent_builds_both_commit(small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    first = build(small_config(catalog, root), log=quiet)
    results = run_together(*(lambda s=seed: build(small_config(catalog, root, seed=s),
                                                  log=quiet) for seed in (1, 2)))
    store = TableStore(root, "sids")
    ids = sorted(r.version_id for r in results)
    assert store.versions() == sorted([first.version_id, *ids])
    assert store.latest() == ids[-1]
    for r in results:
        m = store.manifest(r.version_id)
        assert m["parent"] == first.version_id
        assert r.drift is not None and r.drift["from_version"] == first.version_id
        assert r.drift["items_common"] == 2400
        assert store.read_data(r.version_id).num_rows == 2400
    leftovers = [p.name for p in Path(root).rglob("*") if ".tmp-" in p.name
                 or "lock" in p.name or p.name == "_staging"]
    assert leftovers == []


def teardown_module() -> None:
    for path in fsspec.filesystem("memory").ls("/", detail=False):
        if "conc-" in path:
            fsspec.filesystem("memory").rm(path, recursive=True)
