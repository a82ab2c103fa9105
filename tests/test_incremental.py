"""Incremental versions: `semid encode --incremental` with a catalog of new and changed items
extends its parent (carried rows, referenced parts, collisions around the parent's SIDs)."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from semid_dist.cleanup import delete_version, unlist
from semid_dist.cli import main
from semid_dist.errors import ConfigError, InputError, StoreError
from semid_dist.io.store import FileEntry, TableStore
from semid_dist.pipeline import build
from semid_dist.quantize.artifact import ARRAYS_FILE, META_FILE
from semid_dist.quantize.model import load_quantizer as quantizer_from_files
from semid_dist.reduce_tasks import REPLACED_SCHEMA, kept_rows, replaced_by_shard
from tests.conftest import (
    INC_CHANGED,
    INC_N,
    INC_NEW,
    clustered,
    ray_session_dir,
    small_config,
    write_catalog,
)

N, NEW, CHANGED = INC_N, INC_NEW, INC_CHANGED

def quiet(msg: str) -> None:
    pass


@pytest.fixture()
def catalogs(incremental_catalogs):
    return incremental_catalogs


def by_id(t: pa.Table) -> pa.Table:
    return t.sort_by("item_id")


def codes(t: pa.Table) -> np.ndarray:
    return np.array(t.column("codes").to_pylist())


def parent_and_child(catalogs, tmp_path):
    """A parent built from the parent catalog, then its incremental child from the delta."""
    root = str(tmp_path / "out")
    first = build(small_config(catalogs["parent"], root), log=quiet)
    child = build(small_config(catalogs["delta"], root, encode__from_version="latest",
                               encode__incremental=True), log=quiet)
    return root, TableStore(root, "sids"), first, child


def test_an_incremental_version_leaves_latest_to_one_committed_while_it_was_built(catalogs,
                                                                                 tmp_path):
    """Two incremental encodes of one parent at once, the one started first committing
    first: it is served; the other is committed, but `_latest` stays at the first (the
    other extends the parent and holds none of the first's rows: `_latest` moved to it, by
    its newer id, and dropped them with no word), and a warning names both versions and
    the fix."""
    root = str(tmp_path / "out")
    first = build(small_config(catalogs["parent"], root), log=quiet)
    extra = write_catalog(tmp_path / "extra", clustered(120, 12, seed=9),
                          ids=np.arange(10_000, 10_120, dtype=np.int64))
    encoding, go, early = threading.Event(), threading.Event(), []

    def early_log(line: str) -> None:  # waits in its encode for the other to start encoding
        if line.startswith("encode:") and not encoding.is_set():
            encoding.set()
            go.wait(120)

    thread = threading.Thread(target=lambda: early.append(build(
        small_config(extra, root, encode__from_version="latest", encode__incremental=True),
        log=early_log)))
    thread.start()
    assert encoding.wait(120)
    lines = []

    def log(line: str) -> None:  # the first commits while this one encodes
        lines.append(line)
        if line.startswith("encode:") and not go.is_set():
            go.set()
            thread.join(120)

    late = build(small_config(catalogs["delta"], root, encode__from_version="latest",
                              encode__incremental=True), log=log)
    store = TableStore(root, "sids")
    assert early and store.latest() == early[0].version_id
    assert store.versions() == [first.version_id, early[0].version_id, late.version_id]
    assert late.manifest["parent"] == early[0].manifest["parent"] == first.version_id
    served = pq.read_table(store.part_paths("latest"), columns=["item_id"])
    assert set(range(10_000, 10_120)) <= set(served.column("item_id").to_pylist())
    warning = next(line for line in lines if line.startswith("warning: _latest stays"))
    assert (f"_latest stays at {early[0].version_id}" in warning
            and f"{late.version_id} extends {first.version_id}" in warning
            and f"encode.from_version={early[0].version_id}" in warning), warning


def test_incremental_version_carries_references_and_matches_a_full_encode(catalogs, tmp_path):
    root, store, first, child = parent_and_child(catalogs, tmp_path)
    m = store.manifest(child.version_id)
    assert m["parent"] == first.version_id
    # "latest" is resolved once: the codebooks, the parent and the run key name one version
    assert m["config"]["encode"]["from_version"] == first.version_id
    assert m["rows"] == {"input": NEW + CHANGED, "encoded": NEW + CHANGED, "rejected": 0,
                         "carried": N - CHANGED, "replaced": CHANGED}
    # unchanged parent parts are referenced, not copied; the part with changed items is
    # rewritten in the child's own directory
    data = [e for e in m["files"] if e["path"].startswith("data/")]
    referenced = [e for e in data if e.get("version") == first.version_id]
    parent_data = [e for e in store.manifest(first.version_id)["files"]
                   if e["path"].startswith("data/")]
    assert referenced and len(referenced) < len(parent_data)
    assert {e["sha256"] for e in referenced} <= {e["sha256"] for e in parent_data}
    inc = child.metrics["incremental"]
    assert inc["parts_referenced"] == len(referenced)
    assert inc["parts_rewritten"] == len(parent_data) - len(referenced) >= 1
    # another reader reads the version by its part URLs; its data/ folder holds a part
    urls = store.part_urls(child.version_id)
    assert len(urls) == len(data) and all(u.startswith(root) for u in urls)
    whole = store.read_data(child.version_id)
    assert ds.dataset(urls).to_table().equals(whole)
    assert ds.dataset(store.part_paths(child.version_id), filesystem=store.fs
                      ).to_table().equals(whole)
    assert ds.dataset(f"{store.version_dir(child.version_id)}/data").count_rows() < N

    t, old = by_id(store.read_data(child.version_id)), by_id(store.read_data(first.version_id))
    ids = t.column("item_id").to_numpy()
    assert len(ids) == N + NEW and len(np.unique(ids)) == len(ids)
    # carried items keep their SID and suffix exactly
    carried = ~np.isin(ids, catalogs["changed"]) & (ids < N)
    kept_old = old.filter(pa.array(~np.isin(old.column("item_id").to_numpy(),
                                            catalogs["changed"])))
    for col in ("codes", "sid", "suffix"):
        assert t.filter(pa.array(carried)).column(col).equals(kept_old.column(col))
    # (SID, suffix) is unique over the whole table
    pairs = {(tuple(s), x) for s, x in zip(t.column("sid_tokens").to_pylist(),
                                           t.column("suffix").to_pylist())}
    assert len(pairs) == t.num_rows

    # a full encode of the union catalog with the same codebooks gives the same codes, and
    # the incremental version's count figures equal the full version's
    full = build(small_config(catalogs["union"], root, encode__from_version=first.version_id),
                 log=quiet)
    f = by_id(store.read_data(full.version_id))
    assert f.column("item_id").equals(t.column("item_id"))
    assert np.array_equal(codes(f), codes(t))
    for section in ("layers", "prefixes", "conditional", "collisions", "collisions_before"):
        assert child.metrics[section] == full.metrics[section], section
    assert child.metrics["reconstruction"]["mse"] == pytest.approx(
        full.metrics["reconstruction"]["mse"], rel=1e-5)
    assert child.metrics["quality"]["semantic_cohesion"] == pytest.approx(
        full.metrics["quality"]["semantic_cohesion"], abs=0.02)
    assert inc["estimated"]  # replaced rows make some figures estimates, and say so
    # the SID -> items lookup covers carried and new items
    lookup = store.read_data(child.version_id, "lookup/sid_items")
    assert pc.sum(lookup.column("count")).as_py() == N + NEW
    # ... and maps a SID's <S k> to the item whose suffix is k, where replaced items left
    # gaps (a list position was taken for the suffix: another item than the SID's)
    held = {(tuple(sid), k): item for sid, item, k in zip(
        t.column("sid_tokens").to_pylist(), t.column("item_id").to_pylist(),
        t.column("suffix").to_pylist())}
    listed = {(tuple(sid), k): item for sid, items, ks in zip(
        *(lookup.column(c).to_pylist() for c in ("sid_tokens", "items", "suffixes")))
        for item, k in zip(items, ks)}
    assert listed == held
    assert any(ks != list(range(len(ks))) for ks in lookup.column("suffixes").to_pylist())
    # the drift against the parent: only the changed items can move
    assert child.drift["items_common"] == N and child.drift["items_only_to"] == NEW
    assert 0 < child.drift["changed"] <= CHANGED


def test_incremental_chain_and_gc_keep_referenced_parts(catalogs, tmp_path):
    root, store, first, child = parent_and_child(catalogs, tmp_path)
    # an incremental version of an incremental version: re-encoding the same delta replaces
    # exactly the delta's rows and carries the rest, references included
    grand = build(small_config(catalogs["delta"], root, encode__from_version="latest",
                               encode__incremental=True, seed=8), log=quiet)
    rows = store.manifest(grand.version_id)["rows"]
    assert rows["carried"] == N - CHANGED and rows["replaced"] == NEW + CHANGED
    assert by_id(store.read_data(grand.version_id)).column("codes").equals(
        by_id(store.read_data(child.version_id)).column("codes"))
    refs = {e.get("version") for e in store.manifest(grand.version_id)["files"]}
    assert first.version_id in refs
    # a version that replaces nothing still says its figures hold its ancestors' estimates
    extra = write_catalog(tmp_path / "extra", clustered(30, 12, seed=6),
                          ids=np.arange(50_000, 50_030))
    last = build(small_config(extra, root, encode__from_version="latest",
                              encode__incremental=True), log=quiet)
    assert last.metrics["incremental"]["replaced"] == 0
    assert last.metrics["incremental"]["estimated"]
    # gc keeping only the newest version keeps the versions whose parts it reads
    out = store.gc(keep=1, min_age_hours=0)
    # (the child stays too: its rewritten copy of a parent part is carried on)
    assert {first.version_id, child.version_id, grand.version_id,
            last.version_id} <= set(out["kept"])
    # parts whose every row was replaced are dropped, not carried on as empty files
    assert all(e["rows"] > 0 for e in store.manifest(grand.version_id)["files"]
               if e["path"].startswith("data/"))
    assert store.read_data(last.version_id).num_rows == N + NEW + 30
    # a commit naming files of a version gc removed is refused
    entry = FileEntry("data/part-x.parquet", 0, 0, "0" * 64, version=child.version_id)
    unlist(store, child.version_id, committed=True)  # as gc removes a version
    delete_version(store, child.version_id)
    with pytest.raises(StoreError, match=f"version {child.version_id}, which is no longer"):
        store.commit("20991231T000000000000Z-abcdef",
                     {"rows": {"input": 0, "encoded": 0, "rejected": 0}}, [entry])


def test_incremental_capacity_keeps_carried_sids(catalogs, tmp_path):
    root = str(tmp_path / "out")
    store = TableStore(root, "sids")
    cap = 6
    opts = {"collisions__max_per_sid": cap, "collisions__candidates": 8}
    build(small_config(catalogs["parent"], root, **opts), log=quiet)
    parent = by_id(store.read_data())
    child = build(small_config(catalogs["delta"], root, encode__from_version="latest",
                               encode__incremental=True, **opts), log=quiet)
    t = by_id(store.read_data(child.version_id))
    keep = ~np.isin(parent.column("item_id").to_numpy(), catalogs["changed"])
    ids = t.column("item_id").to_numpy()
    carried = np.isin(ids, parent.column("item_id").to_numpy()[keep])
    assert t.filter(pa.array(carried)).column("sid").equals(
        parent.filter(pa.array(keep)).column("sid"))
    # `reassigned` counts this version's moves: its delta items not on their nearest codes
    delta = by_id(pq.read_table(catalogs["delta"]))
    books = {name: store.read_bytes(child.version_id, f"codebooks/{name}")
             for name in (ARRAYS_FILE, META_FILE)}
    nearest = quantizer_from_files(books).encode(
        np.array(delta.column("embedding").to_pylist(), np.float32)).codes
    staged = codes(t.filter(pa.array(~carried)))
    assert t.filter(pa.array(~carried)).column("item_id").equals(delta.column("item_id"))
    moved = int((staged != nearest).any(axis=1).sum())
    assert child.metrics["collisions"]["reassigned"] == moved > 0
    # a new item is left in an over-full SID only when every last-layer code under its
    # prefix is full (there was nowhere to move it); carried items never move
    sids = [tuple(s) for s in t.column("sid").to_pylist()]
    count = Counter(sids)
    with_new = {s for s, c in zip(sids, carried) if not c}
    last = 8  # quantizer.layers[-1] of small_config
    full = [sid for sid, n in count.items() if n > cap and sid in with_new]
    assert full  # (the case this checks arises in this catalog)
    for sid in full:
        assert all(count.get(sid[:-1] + (j,), 0) >= cap for j in range(last)), sid
    # a child without the parent's bound is built, and says so (it went unsaid)
    lines: list[str] = []
    build(small_config(catalogs["delta"], root, encode__from_version=child.version_id,
                       encode__incremental=True), log=lines.append)
    assert (f"warning: version {child.version_id} was built with collisions.max_per_sid={cap}, "
            "this version with none: it applies to this version's new items only (the carried "
            f"items keep their SIDs); set collisions.max_per_sid={cap} to keep the table's "
            "bound" in lines), [line for line in lines if "warning" in line]
    assert lines.index(next(line for line in lines if "max_per_sid" in line)) < lines.index(
        next(line for line in lines if line.startswith("encode:")))  # (said before the encode)


@pytest.mark.parametrize("cap", [None, 6])
def test_incremental_past_gather_rows_matches_the_gathered_version(catalogs, tmp_path, cap):
    """More rows of colliding (and over-full) SIDs than driver.gather_rows: tasks rank the new
    items' suffixes around the carried rows' in key ranges (and move their overflow in
    prefix ranges, the carried rows holding their places) through staging: the same table,
    figures and vocabulary as gathering them on the driver, and no scratch left."""
    root = str(tmp_path / "out")
    store = TableStore(root, "sids")
    opts = {} if cap is None else {"collisions__max_per_sid": cap, "collisions__candidates": 8}
    first = build(small_config(catalogs["parent"], root, **opts), log=quiet)
    logs: list[str] = []
    children = [build(small_config(catalogs["delta"], root, encode__from_version=first.version_id,
                                   encode__incremental=True, driver__gather_rows=gather, **opts),
                      log=log)
                for gather, log in ((10**6, quiet), (200, logs.append))]
    assert any(m.startswith("collisions: ranking") and "of carried parts" in m for m in logs)
    if cap is not None:
        assert any(m.startswith("collisions: moving the overflow of") for m in logs), logs
        assert children[0].metrics["collisions"]["reassigned"] > 0
    a, b = (by_id(store.read_data(r.version_id)) for r in children)
    assert a.num_rows == N + NEW and a.equals(b)
    # new items took suffixes beside carried ones: (SID, suffix) is unique over the table
    pairs = {(tuple(s), x) for s, x in zip(b.column("sid_tokens").to_pylist(),
                                           b.column("suffix").to_pylist())}
    assert len(pairs) == b.num_rows
    new = ~np.isin(b.column("item_id").to_numpy(), np.arange(N)) | np.isin(
        b.column("item_id").to_numpy(), catalogs["changed"])
    assert (b.column("suffix").to_numpy()[new] > 0).any()
    ma, mb = (r.metrics for r in children)
    for exact in ("collisions", "layers", "conditional", "pruning", "incremental"):
        assert ma[exact] == mb[exact], exact
    for name in ("mse", "relative_error"):
        assert mb["reconstruction"][name] == pytest.approx(ma["reconstruction"][name],
                                                           rel=1e-12)
    vocab = [pq.read_table(f"{store.version_dir(r.version_id)}/vocab.parquet") for r in children]
    assert vocab[0].equals(vocab[1])
    suffixes = vocab[1].filter(pc.equal(vocab[1].column("kind"), "suffix"))
    held = np.bincount(b.column("suffix").to_numpy())  # carried and new rows alike
    assert suffixes.column("items").to_pylist() == held.tolist()
    assert not Path(store.version_dir(children[1].version_id), "_staging").exists()


@pytest.mark.parametrize("cap", [None, 6])
def test_an_item_sent_again_keeps_its_suffix_where_its_sid_stays(catalogs, tmp_path, cap):
    """Parent items sent again in a delta (unchanged, or changed but ending in the same SID)
    keep their suffixes, as carried items do, beside new items of lower error joining their
    SIDs (they were ranked among them and moved); the new items take the suffixes left free.
    Under a capacity bound the unchanged ones keep their places too. The same table on the
    driver and by tasks past driver.gather_rows."""
    root = str(tmp_path / "out")
    store = TableStore(root, "sids")
    opts = {} if cap is None else {"collisions__max_per_sid": cap, "collisions__candidates": 8}
    first = build(small_config(catalogs["parent"], root, **opts), log=quiet)
    parent = by_id(store.read_data(first.version_id))
    again = catalogs["again"]
    resent = by_id(pq.read_table(catalogs["resent"]))
    ids = resent.column("item_id").to_numpy()
    children = [build(small_config(catalogs["resent"], root,
                                   encode__from_version=first.version_id,
                                   encode__incremental=True, driver__gather_rows=gather, **opts),
                      log=quiet)
                for gather in (10**6, 200)]
    a, b = (by_id(store.read_data(r.version_id)) for r in children)
    assert a.num_rows == N + NEW and a.equals(b)
    assert children[0].metrics["collisions"] == children[1].metrics["collisions"]
    before = parent.filter(pa.array(np.isin(parent.column("item_id").to_numpy(), ids)))
    after = a.filter(pa.array(np.isin(a.column("item_id").to_numpy(), before.column("item_id"))))
    same_sid = np.array([p == q for p, q in zip(before.column("sid").to_pylist(),
                                                after.column("sid").to_pylist())])
    unchanged = np.isin(before.column("item_id").to_numpy(), again)
    # unchanged embeddings, the same codebooks: the same codes and SIDs, under a capacity
    # bound too (they hold their places as carried items do; new items of lower error moved
    # them), but for those the parent's bound had moved off their nearest codes
    books = {name: store.read_bytes(first.version_id, f"codebooks/{name}")
             for name in (ARRAYS_FILE, META_FILE)}
    sent = resent.filter(pa.array(np.isin(ids, again)))  # in id order, as `before`'s
    nearest = quantizer_from_files(books).encode(
        np.array(sent.column("embedding").to_pylist(), np.float32)).codes
    old, now = (codes(t.filter(pa.array(unchanged))) for t in (before, after))
    stay = (old == nearest).all(axis=1)
    assert stay.mean() > 0.9 and np.array_equal(old[stay], now[stay])
    assert same_sid[unchanged][stay].all() and same_sid[~unchanged].sum() >= 20
    if cap is None:
        assert stay.all()
    else:
        assert children[0].metrics["collisions"]["reassigned"] > 0
    kept = before.column("suffix").to_numpy()[same_sid]
    assert np.array_equal(after.column("suffix").to_numpy()[same_sid], kept)
    assert (kept > 0).sum() > 20  # (items that held a suffix past 0 were sent again)
    # new items joined those SIDs and took free suffixes: (SID, suffix) is unique
    pairs = {(tuple(s), x) for s, x in zip(a.column("sid_tokens").to_pylist(),
                                           a.column("suffix").to_pylist())}
    assert len(pairs) == a.num_rows
    new = ~np.isin(a.column("item_id").to_numpy(), np.arange(N))
    shared = {tuple(s) for s in after.column("sid").to_pylist()} & {
        tuple(s) for s in a.filter(pa.array(new)).column("sid").to_pylist()}
    assert len(shared) > 10
    vocab = pq.read_table(f"{store.version_dir(children[1].version_id)}/vocab.parquet")
    suffixes = vocab.filter(pc.equal(vocab.column("kind"), "suffix"))
    assert suffixes.column("items").to_pylist() == np.bincount(
        a.column("suffix").to_numpy()).tolist()


@pytest.mark.parametrize("kind", ["int", "string"])
def test_replaced_rows_are_found_by_shard_and_row_and_kept_where_the_sid_stays(kind):
    """The parent rows a delta replaces are looked up once, on the driver, by the shard and
    row re-encoding each item; a shard's rows keep the suffixes of those whose final SID is
    the one the item had."""
    rng = np.random.default_rng(3)
    order = rng.permutation(60)
    as_ids = (lambda a: pa.array(a.astype(np.int64))) if kind == "int" else (
        lambda a: pa.array([f"item-{i}" for i in a], pa.string()))
    shard_ids = [as_ids(order[lo:hi]) for lo, hi in ((0, 25), (25, 25), (25, 45), (45, 60))]
    gone = rng.choice(60, 18, replace=False)
    keys, suffix = rng.integers(0, 1000, 18), rng.integers(0, 5, 18).astype(np.int32)
    lengths, catalog = [len(a) for a in shard_ids], pa.concat_arrays(shard_ids)
    out = replaced_by_shard(lengths, catalog, as_ids(gone), keys, suffix)
    assert [t.schema for t in out] == [REPLACED_SCHEMA] * 4 and out[1].num_rows == 0
    assert sum(t.num_rows for t in out) == len(gone)
    old = {i: (k, x) for i, k, x in zip(as_ids(gone).to_pylist(), keys, suffix)}
    for ids, t in zip(shard_ids, out):
        rows = t.column("row").to_numpy()
        assert np.all(np.diff(rows) > 0)
        for row, k, x in zip(rows, t.column("key").to_pylist(), t.column("suffix").to_pylist()):
            assert old[ids[int(row)].as_py()] == (k, x)
    # a shard's final keys: its first two replaced rows stay in their SIDs, the rest moved
    t = next(t for t in out if t.num_rows >= 3)
    final = np.full(25, -1, np.int64)
    rows, k = t.column("row").to_numpy(), t.column("key").to_numpy()
    final[rows[:2]], final[rows[2:]] = k[:2], k[2:] + 1
    kept, kept_suffix = kept_rows(final, t)
    assert kept.tolist() == rows[:2].tolist()
    assert kept_suffix.tolist() == t.column("suffix").to_pylist()[:2]
    assert kept_rows(final, None)[0].size == 0
    assert [t.num_rows for t in replaced_by_shard(lengths, catalog, as_ids(gone)[:0],
                                                  keys[:0], suffix[:0])] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="not among the catalog's ids"):
        replaced_by_shard([25], shard_ids[0], as_ids(gone), keys, suffix)


def test_incremental_that_replaces_every_parent_row(catalogs, tmp_path):
    """A delta holding every item of its parent (some changed) and new ones carries no part:
    the parent's items that stay in their SIDs keep their suffixes, and the others are
    ranked for the suffixes these leave free, on the driver and by tasks alike; the figures
    are the new rows' own, as a full encode's."""
    root = str(tmp_path / "out")
    store = TableStore(root, "sids")
    first = build(small_config(catalogs["parent"], root), log=quiet)
    logs: list[str] = []
    children = [build(small_config(catalogs["union"], root, encode__from_version=first.version_id,
                                   encode__incremental=True, driver__gather_rows=gather),
                      log=log)
                for gather, log in ((10**6, quiet), (200, logs.append))]
    assert any(m.startswith("collisions: ranking") for m in logs), logs
    a, b = (by_id(store.read_data(r.version_id)) for r in children)
    assert a.num_rows == N + NEW and a.equals(b)
    parent = by_id(store.read_data(first.version_id))
    full = build(small_config(catalogs["union"], root, encode__from_version=first.version_id),
                 log=quiet)
    f = by_id(store.read_data(full.version_id))
    assert np.array_equal(codes(a), codes(f))  # the same codebooks, the same codes
    old = a.filter(pa.array(a.column("item_id").to_numpy() < N))
    same = np.array([p == q for p, q in zip(parent.column("sid").to_pylist(),
                                            old.column("sid").to_pylist())])
    assert same.sum() > N - CHANGED and np.array_equal(
        old.column("suffix").to_numpy()[same], parent.column("suffix").to_numpy()[same])
    pairs = {(tuple(s), x) for s, x in zip(a.column("sid_tokens").to_pylist(),
                                           a.column("suffix").to_pylist())}
    assert len(pairs) == a.num_rows
    new = a.filter(pa.array(a.column("item_id").to_numpy() >= N))
    assert (new.column("suffix").to_numpy() > 0).any()
    for child in children:
        assert child.metrics["incremental"]["carried"] == 0
        assert child.metrics["incremental"]["replaced"] == N
        # no row carried: the figures are the new rows' own, exact, and not marked estimated
        assert child.metrics["incremental"]["estimated"] == []
        for key in ("relative_error", "residual_norm_by_layer"):
            assert child.metrics["reconstruction"][key] == pytest.approx(
                full.metrics["reconstruction"][key], rel=1e-6), key
        for section in ("layers", "prefixes", "collisions"):
            assert child.metrics[section] == full.metrics[section], section


def test_incremental_errors(catalogs, tmp_path, capsys):
    """What an incremental version needs of its parent is checked before the build writes
    anything (these failed after the whole delta was encoded, its staged shards left in an
    uncommitted version)."""
    root = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="encode.from_version"):
        small_config(catalogs["delta"], root, encode__incremental=True)
    build(small_config(catalogs["parent"], root), log=quiet)
    store = TableStore(root, "sids")
    strings = write_catalog(tmp_path / "str", clustered(50, 12, seed=2),
                            ids=np.array([f"s{i}" for i in range(50)], dtype=object))
    with pytest.raises(InputError, match="item ids are string but version .* holds int64 "
                                         "ids; write the catalog's 'item_id' as int64"):
        build(small_config(strings, root, encode__from_version="latest",
                           encode__incremental=True), log=quiet)
    assert store.uncommitted() == []
    with pytest.raises(ConfigError, match="set metrics.quality_depth=2"):
        build(small_config(catalogs["delta"], root, encode__from_version="latest",
                           encode__incremental=True, metrics__quality_depth=1), log=quiet)
    assert store.uncommitted() == []
    first_part = sorted(e["path"] for e in store.manifest(store.latest())["files"]
                        if e["path"].startswith("data/"))[0]
    path = Path(store.version_dir(store.latest())) / first_part
    held = path.read_bytes()
    path.write_bytes(b"not parquet" * 100)
    with pytest.raises(StoreError, match=re.escape(first_part)):
        build(small_config(catalogs["delta"], root, encode__from_version="latest",
                           encode__incremental=True), log=quiet)
    assert store.uncommitted() == []
    path.write_bytes(held)
    # a parent built before stats/ existed cannot be extended: a clear error, no commit
    latest = store.latest()
    manifest = store.manifest(latest)
    manifest["files"] = [e for e in manifest["files"] if not e["path"].startswith("stats/")]
    store.write_file(latest, "_manifest.json", json.dumps(manifest).encode())
    with pytest.raises(StoreError, match="holds no stats/ files"):
        build(small_config(catalogs["delta"], root, encode__from_version="latest",
                           encode__incremental=True), log=quiet)
    assert store.latest() == latest and store.uncommitted() == []
    # a delta whose every row is rejected (allowed: max_reject_fraction 1) names them
    other = str(tmp_path / "other")
    build(small_config(catalogs["parent"], other), log=quiet)
    bad = clustered(50, 12, seed=3)
    bad[:, 0] = np.nan
    with pytest.raises(InputError, match=r"^no valid rows to encode: all 50 rows rejected "
                                         r"\(50 .*\); nothing was committed\. Fix the catalog$"):
        build(small_config(write_catalog(tmp_path / "nan", bad), other,
                           encode__from_version="latest", encode__incremental=True,
                           input__max_reject_fraction=1.0), log=quiet)


def test_cli_encode_incremental(catalogs, tmp_path, capsys):
    root = str(tmp_path / "out")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"engine: local\nseed: 7\ninput: {{path: {catalogs['parent']}}}\n"
                   f"output: {{root: {root}, table: sids}}\nquantizer: {{layers: [16, 8, 8]}}\n"
                   "fit: {sample_size: 1500}\nencode: {shard_rows: 500}\n")
    assert main(["build", "--config", str(cfg)]) == 0
    assert main(["encode", "--config", str(cfg), "--incremental",
                 f"input.path={catalogs['delta']}"]) == 0
    out = capsys.readouterr().out
    assert f"carried {N - CHANGED} from the parent (replaced {CHANGED})" in out
    # the build's summary, then the incremental one's: with replaced rows, estimates
    recon = [line for line in out.splitlines() if line.startswith(("recon ", "quality "))]
    assert len(recon) == 4 and not any("(estimated)" in line for line in recon[:2]), recon
    assert all(line.endswith("(estimated)") for line in recon[2:]), recon
    page = TableStore(root, "sids").read_bytes(TableStore(root, "sids").head(),
                                               "report/report.html").decode()
    assert "relative error (estimated)" in page and "semantic cohesion (SC) (estimated)" in page
    assert '"l">L0 (estimated)</td>' in page and '"l">L1 (estimated)</td>' in page
    assert '"l">L2</td>' in page  # the last layer's residual norms are exact
    # no pruning: no before / after figure (its two panels were the same)
    assert 'id="fig-pruning"' not in page and "No pruning (prune.strategy=none)" in page
    assert main(["versions", "list", "--root", root, "--table", "sids"]) == 0
    assert f"carried {N - CHANGED}  replaced {CHANGED}" in capsys.readouterr().out

    # the config's encode.from_version is the one `semid encode` extends (it was replaced
    # by latest), and --incremental beside an override of it to false is refused (it was
    # silently taken as incremental)
    store = TableStore(root, "sids")
    first, _ = store.versions()
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(cfg.read_text().replace(
        "encode: {shard_rows: 500}", f"encode: {{shard_rows: 500, from_version: {first}}}"))
    assert main(["encode", "--config", str(pinned), "--incremental",
                 f"input.path={catalogs['delta']}"]) == 0
    assert store.manifest(store.versions()[-1])["parent"] == first
    capsys.readouterr()
    for said in ("encode.incremental=false", "encode={incremental: false}"):
        assert main(["encode", "--config", str(cfg), "--incremental", said,
                     f"input.path={catalogs['delta']}"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "semid encode: error: --incremental and the override encode.incremental=false "
            "disagree; drop one")
    assert len(store.versions()) == 3
    # ... as an override of the section names it too
    assert main(["encode", "--config", str(cfg), "--incremental",
                 f"encode={{shard_rows: 500, from_version: {first}}}",
                 f"input.path={catalogs['delta']}"]) == 0
    assert store.manifest(store.versions()[-1])["parent"] == first


def test_rejected_update_keeps_the_parent_row(catalogs, tmp_path):
    root = str(tmp_path / "out")
    store = TableStore(root, "sids")
    first = build(small_config(catalogs["parent"], root), log=quiet)
    x = clustered(40, 12, seed=3)
    x[0] = np.nan  # the update of item 5 is bad: it is rejected, item 5 keeps its row
    ids = np.concatenate([[5], np.arange(20_000, 20_039)])
    delta = write_catalog(tmp_path / "bad", x, ids=ids)
    child = build(small_config(delta, root, encode__from_version="latest",
                               encode__incremental=True, input__max_reject_fraction=0.1),
                  log=quiet)
    rows = store.manifest(child.version_id)["rows"]
    assert rows == {"input": 40, "encoded": 39, "rejected": 1, "carried": N, "replaced": 0}
    t, old = store.read_data(child.version_id), store.read_data(first.version_id)
    pick = pc.equal(t.column("item_id"), 5)
    assert t.filter(pick).column("sid").equals(old.filter(pc.equal(old.column("item_id"), 5))
                                               .column("sid"))
    assert store.read_data(child.version_id, "rejects").column("item_id").to_pylist() == ["5"]
    assert child.metrics["incremental"]["estimated"] == []
    # nothing replaced: every parent part is referenced as it is
    assert child.metrics["incremental"]["parts_rewritten"] == 0


def test_a_delta_without_the_popularity_column_the_config_names(catalogs, tmp_path):
    """An incremental version uses no popularity: a delta without input.popularity_column's
    column encodes as if the key were unset."""
    delta = tmp_path / "delta-no-popularity"
    delta.mkdir()
    for f in Path(catalogs["delta"]).glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["popularity"]), delta / f.name)
    tables = []
    for name, path in (("with", catalogs["delta"]), ("without", str(delta))):
        root = str(tmp_path / name)
        build(small_config(catalogs["parent"], root, input__popularity_column="popularity"),
              log=quiet)
        child = build(small_config(path, root, input__popularity_column="popularity",
                                   encode__from_version="latest", encode__incremental=True),
                      log=quiet)
        tables.append(by_id(TableStore(root, "sids").read_data(child.version_id)))
    assert tables[0].column("sid").equals(tables[1].column("sid"))
    assert tables[0].column("item_id").equals(tables[1].column("item_id"))


def test_an_incremental_version_records_the_pruning_its_sids_have(catalogs, tmp_path):
    """The child keeps its parent's pruning whatever its own prune.* says: its manifest's
    config.prune is the parent's (the pruning its SIDs have), down a chain too."""
    root = str(tmp_path / "out")
    store = TableStore(root, "sids")
    first = build(small_config(catalogs["parent"], root, prune__strategy="top_k",
                               prune__layer=1, prune__k=2), log=quiet)
    logs: list[str] = []
    child = build(small_config(catalogs["delta"], root, encode__from_version="latest",
                               encode__incremental=True), log=logs.append)
    assert any("prune.* of this config is not applied" in m for m in logs)
    applied = store.manifest(first.version_id)["config"]["prune"]
    assert applied["strategy"] == "top_k" and applied["k"] == 2
    assert store.manifest(child.version_id)["config"]["prune"] == applied
    assert child.metrics["pruning"]["strategy"] == "top_k"
    lengths = np.array([len(s) for s in store.read_data(child.version_id)
                        .column("sid_layers").to_pylist()])
    assert (lengths < 3).any()  # new and carried items pruned as the parent's were
    grandchild = build(small_config(catalogs["delta"], root, encode__from_version="latest",
                                    encode__incremental=True, prune__strategy="mass",
                                    prune__p=0.3),
                       log=quiet)
    assert store.manifest(grandchild.version_id)["config"]["prune"] == applied


def test_an_incremental_version_says_what_it_changes_against_its_parent(catalogs, tmp_path):
    """Re-indexing footguns the plan line did not show: a delta read from another embedding
    column than its parent's rows (another model's embeddings mixed into the table), and a
    parent that is not the latest version (the table's latest moves to this branch)."""
    root = str(tmp_path / "out")
    first = build(small_config(catalogs["parent"], root), log=quiet)
    build(small_config(catalogs["parent"], root, seed=9), log=quiet)
    lines: list[str] = []  # the usual incremental version, from the latest: no warning
    newer = build(small_config(catalogs["delta"], root, encode__from_version="latest",
                               encode__incremental=True), log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")], lines
    delta = pq.read_table(catalogs["delta"])
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    pq.write_table(delta.rename_columns(["item_id", "emb_v2", "popularity"]),
                   renamed / "part-000.parquet")
    lines.clear()
    child = build(small_config(str(renamed), root, encode__from_version=first.version_id,
                               encode__incremental=True, input__embedding_column="emb_v2"),
                  log=lines.append)
    assert (f"warning: input.embedding_column=emb_v2, but version {first.version_id}, whose "
            "rows this version carries, was encoded from column embedding: if the two hold "
            "another model's embeddings, the table mixes them; `semid build` re-indexes every "
            "item" in lines), lines
    assert (f"warning: encode.from_version={first.version_id} is not the latest version "
            f"({newer.version_id}): this version extends {first.version_id}, not "
            f"{newer.version_id}, and becomes the latest when it commits (unless another "
            "version is committed meanwhile)" in lines), lines
    assert TableStore(root, "sids").latest() == child.version_id


def test_an_empty_delta_is_an_error_or_under_skip_nothing_to_encode(catalogs, tmp_path,
                                                                     capsys):
    """A delta whose files hold no row (a day without changes) fails as any empty catalog
    (it may be a failed export); with encode.empty_delta=skip the encode and its dry run
    end with status 0 and one line saying so, writing nothing. A full build of an empty
    catalog stays an error, and a folder with no Parquet file (a wrong path, as likely)
    too."""
    root = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"engine: local\nseed: 7\ninput: {{path: {catalogs['parent']}}}\n"
                   f"output: {{root: {root}, table: sids}}\nquantizer: {{layers: [16, 8, 8]}}\n"
                   "fit: {sample_size: 1500}\nencode: {shard_rows: 500}\n")
    assert main(["build", "--config", str(cfg)]) == 0
    capsys.readouterr()
    latest = TableStore(str(root), "sids").latest()
    empty = write_catalog(tmp_path / "empty", np.zeros((0, 12), np.float32),
                          ids=np.zeros(0, np.int64), files=2)
    before = {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}
    inc = ["encode", "--config", str(cfg), "--incremental", f"input.path={empty}"]
    assert main(inc) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"semid encode: error: the delta at {empty!r} has no rows (2 Parquet "
                   "file(s), all empty); export it again, or set encode.empty_delta=skip "
                   "where a day without changes is expected (nothing is written then)")
    for extra in ([], ["--dry-run"]):
        assert main([*inc, "encode.empty_delta=skip", *extra]) == 0
        out = capsys.readouterr().out.strip()
        assert out == (f"nothing to encode: the delta at {empty!r} has no rows (2 Parquet "
                       "file(s), all empty; encode.empty_delta=skip); nothing was written, the "
                       f"table {root}/sids is as it was (latest {latest})"), out
    assert main([*inc, "encode.empty_delta=skip", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version_id"] is None
    session = ray_session_dir()  # no engine is started to find nothing to encode
    assert main([*inc, "encode.empty_delta=skip", "engine=ray"]) == 0
    assert ray_session_dir() == session and "nothing to encode" in capsys.readouterr().out
    # empty files of another form than the table's (a failed export?) are not skipped
    wider = write_catalog(tmp_path / "wider", np.zeros((0, 13), np.float32),
                          ids=np.zeros(0, np.int64))
    strings = write_catalog(tmp_path / "strings", np.zeros((0, 12), np.float32),
                            ids=np.array([], dtype=str))
    for path, said in ((wider, "embedding dim 13 != codebook dim 12"),
                       (strings, "the catalog's item ids are string but version")):
        assert main([*inc[:-1], f"input.path={path}", "encode.empty_delta=skip"]) == 2
        assert said in capsys.readouterr().err
    assert {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} == before
    for args in (["build", "--config", str(cfg), f"input.path={empty}",
                  "encode.empty_delta=skip"],
                 [*inc[:-1], f"input.path={tmp_path / 'nothing'}", "encode.empty_delta=skip"]):
        (tmp_path / "nothing").mkdir(exist_ok=True)
        assert main(args) == 2, args
        assert "error:" in capsys.readouterr().err
    assert TableStore(str(root), "sids").versions() == [latest]
