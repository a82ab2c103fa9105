"""Drift between versions (pure counting, bucketed join, build + CLI) and warm-started fits."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.cli import main
from semid_dist.codes.drift import (
    bucket_count,
    drift_counts,
    drift_figures,
    id_buckets,
    merge_drift,
    padded_lists,
)
from semid_dist.diff import DRIFT_FILE, version_drift
from semid_dist.engines.local import LocalEngine
from semid_dist.errors import ConfigError, StoreError
from semid_dist.io.store import TableStore, new_version_id
from semid_dist.pipeline import build
from semid_dist.quantize.encode import nearest
from semid_dist.quantize.kmeans import kmeans
from semid_dist.quantize.residual import check_warm_start, fit_residual_kmeans
from semid_dist.summary import format_summary
from tests.conftest import DEMO, REPO, clustered, small_config


def quiet(msg: str) -> None:
    pass


# -- pure: hashing, counting, merging --------------------------------------------------------

def test_id_buckets_are_stable_across_processes_and_types():
    ints = pa.array([0, 1, 2, 7, -5, 2**40, 123456789], pa.int64())
    strs = pa.array(["", "a", "b", "item-42", "ünïcode", "a" * 300])
    here = [id_buckets(ints, 13).tolist(), id_buckets(strs, 13).tolist()]
    code = ("import json, pyarrow as pa\n"
            "from semid_dist.codes.drift import id_buckets\n"
            "print(json.dumps([id_buckets(pa.array([0, 1, 2, 7, -5, 2**40, 123456789]), 13)"
            ".tolist(), id_buckets(pa.array(['', 'a', 'b', 'item-42', 'ünïcode', 'a' * 300]),"
            " 13).tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == here
    assert id_buckets(pa.array([0, 1, 2, 7], pa.int32()), 13).tolist() == here[0][:4]
    assert id_buckets(pa.array(["a", "b"], pa.large_string()), 13).tolist() == here[1][1:3]
    sliced = pa.array(["zz", "a", "b"]).slice(1)  # offsets of a slice are honoured
    assert id_buckets(sliced, 13).tolist() == here[1][1:3]
    spread = np.bincount(id_buckets(pa.array(np.arange(100_000)), 8), minlength=8)
    assert spread.min() > 11_000  # about 12,500 each
    spread = np.bincount(id_buckets(pa.array([f"sku-{i}" for i in range(40_000)]), 8))
    assert spread.min() > 4_300
    assert id_buckets(pa.array([], pa.string()), 4).tolist() == []
    with pytest.raises(StoreError, match="cannot be compared"):
        id_buckets(pa.array([1.5]), 4)


def random_version(rng: np.random.Generator, ids: np.ndarray, sizes: tuple[int, ...],
                   *, string_ids: bool = False) -> pa.Table:
    """A data part: item_id, codes, sid (a random subset of layers), sid_layers, suffix."""
    n, depth = len(ids), len(sizes)
    codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1).astype(np.int32)
    keep = rng.random((n, depth)) < 0.8
    keep[:, 0] = True
    sid = [codes[i][keep[i]].tolist() for i in range(n)]
    layers = [np.flatnonzero(keep[i]).tolist() for i in range(n)]
    return pa.table({
        "item_id": pa.array([f"id{i}" for i in ids]) if string_ids else pa.array(ids),
        "codes": pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel()), depth),
        "sid": pa.array(sid, pa.list_(pa.int32())),
        "sid_layers": pa.array(layers, pa.list_(pa.int8())),
        "suffix": pa.array(rng.integers(0, 2, n).astype(np.int32)),
        "qerr": pa.array(rng.random(n).astype(np.float32)),
    })


def brute_drift(old: pa.Table, new: pa.Table) -> dict:
    a = {r["item_id"]: r for r in old.to_pylist()}
    b = {r["item_id"]: r for r in new.to_pylist()}
    common = sorted(set(a) & set(b), key=str)
    width = max(len(next(iter(a.values()))["codes"]), len(next(iter(b.values()))["codes"]))
    layer = [0] * width
    changed = 0
    for i in common:
        ca, cb = a[i]["codes"], b[i]["codes"]
        for w in range(width):
            if w >= len(ca) or w >= len(cb) or ca[w] != cb[w]:
                layer[w] += 1
        changed += (a[i]["sid"], a[i]["sid_layers"], a[i]["suffix"]) != (
            b[i]["sid"], b[i]["sid_layers"], b[i]["suffix"])
    return {"common": len(common), "only_from": len(a) - len(common),
            "only_to": len(b) - len(common), "changed": changed, "layer_changed": layer}


@pytest.mark.parametrize("string_ids", [False, True])
def test_drift_counts_match_brute_force_whole_and_by_bucket(string_ids):
    rng = np.random.default_rng(0)
    old = random_version(rng, np.arange(0, 600), (4, 3, 3), string_ids=string_ids)
    new = random_version(rng, rng.permutation(np.arange(100, 750)), (4, 3, 3),
                         string_ids=string_ids)
    want = brute_drift(old, new)
    assert want["changed"] and want["only_from"] == 100 and want["only_to"] == 150
    assert drift_counts(old, new) == want
    for buckets in (2, 5):
        ob = id_buckets(old.column("item_id"), buckets)
        nb = id_buckets(new.column("item_id"), buckets)
        parts = [drift_counts(old.filter(pa.array(ob == b)), new.filter(pa.array(nb == b)))
                 for b in range(buckets)]
        assert merge_drift(parts) == want
    same = drift_counts(old, old)
    assert same["changed"] == 0 and same["layer_changed"] == [0, 0, 0]


def test_drift_counts_edge_cases():
    rng = np.random.default_rng(1)
    a = random_version(rng, np.arange(10), (4, 4))
    b = random_version(rng, np.arange(10), (4, 4, 4))  # a layer only the new version has
    got = drift_counts(a, b)
    assert got["layer_changed"][2] == 10 and got["changed"] == brute_drift(a, b)["changed"]
    empty = drift_counts(a.slice(0, 0), a)
    assert empty == {"common": 0, "only_from": 0, "only_to": 10, "changed": 0,
                     "layer_changed": [0, 0]}
    fig = drift_figures(empty, from_version="v1", to_version="v2")
    assert fig["share_changed"] is None and fig["items_only_to"] == 10
    as_int32 = a.set_column(0, "item_id", pa.array(np.arange(10, dtype=np.int32)))
    assert drift_counts(as_int32, a)["changed"] == 0
    stringy = a.set_column(0, "item_id", pa.array([str(i) for i in range(10)]))
    with pytest.raises(StoreError, match="cannot be matched"):
        drift_counts(stringy, a)
    assert bucket_count(0) == 1 and bucket_count(2_500_000) == 3
    assert bucket_count(10**12) == 1024
    assert merge_drift([]) == {"common": 0, "only_from": 0, "only_to": 0, "changed": 0,
                               "layer_changed": []}


# -- version_drift over a store ---------------------------------------------------------------

def commit_parts(store: TableStore, parts: list[pa.Table], parent: str | None = None) -> str:
    """Commit data parts as a new version whose id sorts after every existing one."""
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    vid = new_version_id(start + dt.timedelta(seconds=len(store.version_dirs())))
    files = [store.write_table(vid, f"data/part-{vid}-{i:06d}.parquet", t)
             for i, t in enumerate(parts)]
    rows = sum(t.num_rows for t in parts)
    store.commit(vid, {"rows": {"input": rows, "encoded": rows, "rejected": 0},
                       "parent": parent}, files)
    return vid


@pytest.fixture(params=["memory", "local"])
def root(request, tmp_path):
    if request.param == "memory":
        url = f"memory://drift-{uuid.uuid4().hex[:8]}"
        yield url
        fsspec.filesystem("memory").rm(url, recursive=True)
    else:
        yield str(tmp_path / "drift-root")


def test_version_drift_is_the_same_for_any_bucket_count(root):
    rng = np.random.default_rng(2)
    store = TableStore(root, "sids")
    old = random_version(rng, np.arange(0, 900), (8, 4, 4))
    new = random_version(rng, rng.permutation(np.arange(50, 1000)), (8, 4, 4))
    v1 = commit_parts(store, [old.slice(0, 300), old.slice(300, 400), old.slice(700)])
    v2 = commit_parts(store, [new.slice(0, 500), new.slice(500)], parent=v1)
    want = brute_drift(old, new)
    results = [version_drift(store, v1, v2, buckets=b) for b in (1, 3, 8)]
    for res, b in zip(results, (1, 3, 8)):
        assert res["buckets"] == b
        assert res["items_common"] == want["common"] == 850
        assert (res["items_only_from"], res["items_only_to"]) == (50, 100)
        assert res["changed"] == want["changed"]
        assert [x["changed"] for x in res["layers"]] == want["layer_changed"]
        assert res["share_changed"] == pytest.approx(want["changed"] / 850)
    assert not store.fs.exists(f"{store.base}/_scratch")  # in-process: nothing written to the table
    assert version_drift(store, "latest", v2)["from_version"] == v2
    with pytest.raises(StoreError, match="does not exist"):
        version_drift(store, "20990101T000000Z-000000", v2)


def test_drift_buckets_run_through_an_engine_map(root):
    rng = np.random.default_rng(3)
    store = TableStore(root, "sids")
    t = random_version(rng, np.arange(300), (4, 4))
    v1 = commit_parts(store, [t.slice(i, 50) for i in range(0, 300, 50)])
    v2 = commit_parts(store, [random_version(rng, np.arange(300), (4, 4))], parent=v1)
    calls = []

    class Recording(LocalEngine):
        def map(self, fn, items):
            items = list(items)
            calls.append((fn.__name__, len(items)))
            return super().map(fn, items)

    res = version_drift(store, v1, v2, engine=Recording(small_config("unused", root)),
                        buckets=4)
    # 4 buckets of 150 rows: the first version's six parts of 50 rows are split in two
    # groups of three, the second version's one part alone; then 4 bucket tasks
    assert calls == [("drift_split", 3), ("drift_bucket", 4)]
    assert res == version_drift(store, v1, v2, buckets=1) | {"buckets": 4}
    scratch = f"{store.base}/_scratch"
    assert not store.fs.exists(scratch) or store.fs.find(scratch) == []  # split files removed


# -- builds and the CLI --------------------------------------------------------------------

def test_build_records_drift_against_its_parent(small_catalog, tmp_path, capsys):
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    first = build(small_config(catalog, root), log=quiet)
    store = TableStore(root, "sids")
    assert first.drift is None
    assert DRIFT_FILE not in [f["path"] for f in first.manifest["files"]]
    same = build(small_config(catalog, root), log=quiet)  # same seed: nothing moves
    assert same.drift["share_changed"] == 0.0 and same.drift["items_common"] == len(x)
    other = build(small_config(catalog, root, seed=99), log=quiet)
    drift = other.drift
    assert drift["from_version"] == same.version_id and drift["to_version"] == other.version_id
    assert 0 < drift["share_changed"] <= 1 and len(drift["layers"]) == 3
    entry = {f["path"]: f for f in other.manifest["files"]}[DRIFT_FILE]
    assert json.loads(store.read_bytes(other.version_id, DRIFT_FILE)) == drift
    assert entry["bytes"] == len(store.read_bytes(other.version_id, DRIFT_FILE))
    text = format_summary(other.version_id, other.path, other.metrics, other.drift)
    assert f"drift     vs {same.version_id}:" in text and "common items changed SID" in text
    # brute force from the committed tables
    want = brute_drift(store.read_data(same.version_id), store.read_data(other.version_id))
    assert drift["changed"] == want["changed"]
    assert [x["changed"] for x in drift["layers"]] == want["layer_changed"]
    # CLI: --to defaults to latest, --from to its parent
    args = ["versions", "diff", "--root", root, "--table", "sids"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == drift
    assert main([*args, "--from", first.version_id, "--to", same.version_id]) == 0
    out = capsys.readouterr().out
    assert f"changed   0 of {len(x)} common items' SIDs (0.00%)" in out
    assert f"from      {first.version_id}" in out
    assert main([*args, "--to", first.version_id]) == 2
    err = capsys.readouterr().err
    assert "has no parent" in err and "--from" in err and err.count("\n") == 1
    assert main(["versions", "show", "--root", root, "--table", "sids"]) == 0
    assert "drift     vs" in capsys.readouterr().out
    store.gc(1)  # the default --from, the parent, gone: said so (it named an id not given)
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"semid versions diff: error: the parent of version {other.version_id}, {same.version_id} "
        "(the default --from), is no longer in the table (removed by semid versions gc, or by "
        "hand); "
        "name the version to compare with: --from VERSION\n")


# -- warm start -----------------------------------------------------------------------------

def test_kmeans_warm_start_starts_from_the_given_centroids():
    x = clustered(3000, 8, clusters=6, seed=4)
    cold, st_cold = kmeans(x, 6, niter=30, seed=0)
    assert st_cold["init"] == "kmeans++"
    warm, st = kmeans(x, 6, niter=1, seed=123, init_centroids=cold)
    assert st["init"] == "warm"
    labels, _ = nearest(x, cold)  # one Lloyd step from exactly the given centroids
    step = np.stack([x[labels == j].astype(np.float64).mean(0) for j in range(6)])
    np.testing.assert_allclose(warm, step, rtol=1e-5, atol=1e-5)
    assert st["iterations"][0]["mse"] <= st_cold["final_mse"] * (1 + 1e-6)
    with pytest.raises(ValueError, match=r"init_centroids has shape \(6, 8\), expected"):
        kmeans(x, 5, init_centroids=cold)
    cbs, st_cbs = fit_residual_kmeans(x, [6, 4], niter=10, seed=0)
    _, stats = fit_residual_kmeans(x, [6, 4], niter=1, seed=9, init_centroids=cbs)
    assert [s["init"] for s in stats] == ["warm", "warm"]
    assert stats[0]["iterations"][0]["mse"] <= st_cbs[0]["final_mse"] * (1 + 1e-6)
    with pytest.raises(ValueError, match="init_centroids holds 1 layers, expected 2"):
        fit_residual_kmeans(x, [6, 4], init_centroids=cbs[:1])


def test_check_warm_start_names_both_shapes():
    cbs = [np.zeros((16, 12), np.float32), np.zeros((8, 12), np.float32)]
    assert [c.shape for c in check_warm_start(cbs, [16, 8], 12, source="parent v1")] == [
        (16, 12), (8, 12)]
    with pytest.raises(ConfigError, match=r"quantizer.layers=\[16, 16\] but parent v1 has "
                                          r"layers \[16, 8\]"):
        check_warm_start(cbs, [16, 16], 12, source="parent v1")
    with pytest.raises(ConfigError, match=r"embedding dim 10 != codebook dim 12 \(parent v1\)"):
        check_warm_start(cbs, [16, 8], 10, source="parent v1")
    # both wrong: the dimension, which only fit.warm_start=none mends (a layers fix would not)
    with pytest.raises(ConfigError, match=r"embedding dim 10 != codebook dim 12 \(parent v1\); "
                                          "set fit.warm_start=none"):
        check_warm_start(cbs, [32, 32], 10, source="parent v1")


def test_warm_start_in_builds(small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    lines: list[str] = []
    first = build(small_config(catalog, root, fit__warm_start="parent"), log=lines.append)
    assert any("no committed version yet; k-means++ init" in m for m in lines)
    store = TableStore(root, "sids")
    meta = json.loads(store.read_bytes(first.version_id, "codebooks/codebooks.json"))
    assert meta["warm_start"] is None
    second = build(small_config(catalog, root, fit__warm_start="parent"), log=quiet)
    meta = json.loads(store.read_bytes(second.version_id, "codebooks/codebooks.json"))
    assert meta["warm_start"] == first.version_id
    # same data, started from the parent's codebooks: the top layer hardly moves
    assert second.drift["layers"][0]["share_changed"] < 0.01
    lines.clear()
    with pytest.raises(ConfigError, match=rf"quantizer.layers=\[16, 8\] but parent version "
                                          rf"{second.version_id} has layers \[16, 8, 8\]"):
        build(small_config(catalog, root, fit__warm_start="parent",
                           quantizer__layers=[16, 8]), log=lines.append)
    assert not any("warm start from" in m for m in lines), lines  # (said before the error)
    assert store.latest() == second.version_id
    assert store.uncommitted() == []  # checked before anything is written


def perturbed_demo(path, *, std: float = 0.01, seed: int = 0) -> str:
    """The demo catalog with N(0, std^2) noise on every embedding, renormalised, float32."""
    t = pq.read_table(DEMO)
    emb = t.column("embedding").combine_chunks()
    d = emb.type.list_size
    x = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    y = x + np.random.default_rng(seed).normal(0.0, std, x.shape)
    y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
    t = t.set_column(t.schema.get_field_index("embedding"), "embedding",
                     pa.FixedSizeListArray.from_arrays(pa.array(y.ravel(), pa.float32()), d))
    pq.write_table(t, path)
    return str(path)


def demo_config(catalog: str, root: str, warm: str):
    from semid_dist.config import parse_config

    return parse_config({"engine": "local", "seed": 0, "input": {"path": catalog},
                         "output": {"root": root, "table": "sids"},
                         "quantizer": {"layers": [256, 256, 256], "niter": 20},
                         "fit": {"sample_size": 15000, "warm_start": warm}})


def test_warm_start_changes_far_fewer_sids_than_cold(tmp_path):
    root = str(tmp_path / "demo")
    v1 = build(demo_config(str(DEMO), root, "none"), log=quiet)
    noisy = perturbed_demo(tmp_path / "perturbed.parquet")
    warm = build(demo_config(noisy, root, "parent"), log=quiet)  # parent: v1
    cold = build(demo_config(noisy, root, "none"), log=quiet)  # parent: warm
    assert warm.manifest["parent"] == v1.version_id == warm.drift["from_version"]
    cold_drift = version_drift(TableStore(root, "sids"), v1.version_id, cold.version_id)
    assert cold_drift["items_common"] == warm.drift["items_common"] == 15000

    def fmt(d: dict) -> str:
        return (f"overall {d['share_changed']:.4f}, per layer "
                + " / ".join(f"{x['share_changed']:.4f}" for x in d["layers"]))

    print(f"\nwarm start drift vs v1: {fmt(warm.drift)}\ncold start drift vs v1: "
          f"{fmt(cold_drift)}")
    assert warm.drift["share_changed"] < 0.5 * cold_drift["share_changed"]
    assert warm.drift["layers"][0]["share_changed"] < 0.5 * cold_drift["layers"][0][
        "share_changed"]


@pytest.mark.engine
def test_drift_buckets_on_ray_match_in_process(ray_session, tmp_path):
    from semid_dist.engines.ray_data import RayEngine

    rng = np.random.default_rng(5)
    store = TableStore(str(tmp_path / "r"), "sids")
    v1 = commit_parts(store, [random_version(rng, np.arange(500), (4, 4, 4))])
    v2 = commit_parts(store, [random_version(rng, np.arange(100, 600), (4, 4, 4))], parent=v1)
    engine = RayEngine(small_config("unused", str(tmp_path), engine="ray"), log=quiet)
    with engine:
        on_ray = version_drift(store, v1, v2, engine=engine, buckets=3)
    assert on_ray == version_drift(store, v1, v2, buckets=3)
    assert on_ray["items_common"] == 400


def test_padded_lists_matches_the_lists_row_by_row():
    """Plain and large lists with nulls, empty lists, a slice and chunks, and fixed-size
    lists: each row holds its list's values, then -1 up to the width (nulls: all -1)."""
    rng = np.random.default_rng(1)

    def expected(col, width: int) -> np.ndarray:
        out = np.full((len(col), width), -1, np.int64)
        for r, values in enumerate(col.to_pylist()):
            out[r, :len(values or [])] = values or []
        return out

    lists = [None if rng.random() < 0.1 else [int(v) for v in rng.integers(0, 300, n)]
             for n in rng.integers(0, 4, 2000)]
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 9, 3000), pa.int32()), 3)
    for arr in (pa.array(lists, pa.list_(pa.int64())), pa.array(lists, pa.large_list(pa.int32())),
                fixed):
        for col in (arr, arr.slice(37, 900), pa.chunked_array([arr[:700], arr[700:]])):
            for width in (3, 5):
                got = padded_lists(col, width)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, expected(col, width))
    assert padded_lists(pa.chunked_array([], pa.list_(pa.int64())), 3).shape == (0, 3)
    # a null list whose offsets still span values of the child array
    masked = pa.ListArray.from_arrays(pa.array([0, 2, 4, 5], pa.int32()), pa.array([7, 8, 9, 6, 5]),
                                      mask=pa.array([False, True, False]))
    np.testing.assert_array_equal(padded_lists(masked, 2), [[7, 8], [-1, -1], [5, -1]])


def test_a_layer_only_one_version_has_is_named_not_counted_as_drift(small_catalog, tmp_path,
                                                                    capsys):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    first = build(small_config(catalog, root), log=quiet)  # layers [16, 8, 8]
    second = build(small_config(catalog, root, quantizer__layers=[16, 8]), log=quiet)
    layers = second.drift["layers"]
    assert (second.drift["layers_from"], second.drift["layers_to"]) == (3, 2)
    assert [x.get("in_both", True) for x in layers] == [True, True, False]
    assert layers[2]["share_changed"] is None and layers[2]["changed"] is None
    assert layers[0]["share_changed"] is not None
    assert main(["versions", "diff", "--root", root, "--table", "sids"]) == 0
    out = capsys.readouterr().out
    assert "a layer of one version only: 3 layers in from, 2 in to" in out
    assert first.version_id in out and "layer 2" not in out
    assert [line.split()[:3] for line in out.splitlines()[-3:]] == [
        ["0", "0", "0.00%"], ["1", "0", "0.00%"], ["2", "-", "-"]]
    assert "per layer 0.00% / 0.00% / - (one version's only)" in format_summary(
        second.version_id, second.path, second.metrics, second.drift)


def test_a_drift_the_build_cannot_measure_is_said_in_the_summary(tmp_path, capsys):
    """A re-index whose item ids changed type (int64 -> string) has a parent it cannot be
    compared with: no drift.json, and the reason in metrics.json (`drift_skipped`), the
    build's summary and `semid versions show`, not only in the log."""
    from tests.conftest import write_catalog

    x = clustered(1200, 12, seed=5)
    root = str(tmp_path / "out")
    first = build(small_config(write_catalog(tmp_path / "a", x), root), log=quiet)
    ids = np.array([f"item-{i}" for i in range(len(x))])
    child = build(small_config(write_catalog(tmp_path / "b", x, ids=ids), root), log=quiet)
    skipped = child.metrics["drift_skipped"]
    assert child.drift is None and skipped["parent"] == first.version_id
    assert skipped["reason"].startswith("item ids of type int64 and string cannot be")
    store = TableStore(root, "sids")
    assert DRIFT_FILE not in {e["path"] for e in store.manifest(child.version_id)["files"]}
    assert store.read_json(child.version_id, "metrics.json")["drift_skipped"] == skipped
    line = f"drift     skipped against {first.version_id}: {skipped['reason']}"
    assert line in format_summary(child.version_id, child.path, child.metrics).splitlines()
    assert main(["versions", "show", "--root", root, "--table", "sids"]) == 0
    assert line in capsys.readouterr().out.splitlines()
    assert "drift_skipped" not in first.metrics  # no parent: nothing to skip


def test_a_re_index_with_another_embedding_dimension_says_so(tmp_path):
    """A new embedding model of another dimension under the same table: the build fits new
    codebooks, says the parent's embeddings had another dimension, and measures drift."""
    from tests.conftest import write_catalog

    root = str(tmp_path / "out")
    first = build(small_config(write_catalog(tmp_path / "a", clustered(1200, 12, seed=5)),
                               root), log=quiet)
    lines: list[str] = []
    child = build(small_config(write_catalog(tmp_path / "b", clustered(1200, 8, seed=6)),
                               root), log=lines.append)
    assert (f"plan: version {first.version_id} encoded 12-dim embeddings, this catalog holds "
            "8-dim ones (another embedding model?): new codebooks, and the drift against it "
            "measures the re-index") in lines, lines
    assert child.drift is not None and child.drift["items_common"] == 1200
    lines.clear()  # the same dimension again: no such line
    build(small_config(write_catalog(tmp_path / "c", clustered(1200, 8, seed=7)), root),
          log=lines.append)
    assert not [line for line in lines if "-dim embeddings" in line], lines


def test_a_diff_of_versions_whose_ids_cannot_be_matched_is_one_line(tmp_path):
    """Versions of integer and of string ids: one line and status 2, said from the parts'
    schemas before either version is read (it read both, then failed): a part whose pages
    are damaged, footer intact, is not read."""
    rng = np.random.default_rng(4)
    store = TableStore(str(tmp_path / "root"), "sids")
    ints = random_version(rng, np.arange(3000), (16, 16, 8))
    v1 = commit_parts(store, [ints.slice(0, 1500), ints.slice(1500)])
    strings = ints.set_column(0, "item_id", pa.array([f"i{i}" for i in range(3000)]))
    commit_parts(store, [strings], parent=v1)
    damaged = Path(store.part_rows(v1)[1][0])
    col = pq.ParquetFile(damaged).metadata.row_group(0).column(0)
    data = bytearray(damaged.read_bytes())
    middle = col.data_page_offset + col.total_compressed_size // 2
    data[middle:middle + 32] = bytes(b ^ 0xFF for b in data[middle:middle + 32])
    damaged.write_bytes(bytes(data))
    run = subprocess.run([sys.executable, "-m", "semid_dist.cli", "versions", "diff",
                          "--root", store.root, "--table", "sids"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr.splitlines()) == (2, [
        "semid versions diff: error: item ids of type int64 and string cannot be matched; "
        "drift compares versions built from the same catalog"])
