"""End-to-end builds on the local engine: commit, determinism, metrics, bad input, failure."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.cli import main
from semid_dist.codebooks import choose_sample
from semid_dist.codes.headsplit import head_threshold
from semid_dist.encode_stage import steps_text
from semid_dist.engines.local import LocalEngine
from semid_dist.errors import ConfigError, InputError, SemidError
from semid_dist.io import fs as fsio
from semid_dist.io.store import STAGING, TableStore
from semid_dist.pipeline import build
from semid_dist.quantize import decode
from semid_dist.stages import JobContext, StepClock, load_codebooks
from tests.conftest import DEMO, REPO, clustered, small_config, write_catalog


def quiet(msg: str) -> None:
    pass


def sorted_table(store: TableStore, version: str) -> pa.Table:
    t = store.read_data(version)
    return t.sort_by("item_id")


@pytest.fixture()
def root(tmp_path) -> str:
    return str(tmp_path / "out")


def test_build_commits_a_reconciled_version(small_catalog, root):
    catalog, x = small_catalog
    res = build(small_config(catalog, root), log=quiet)
    store = TableStore(root, "sids")
    assert store.latest() == res.version_id == store.versions()[-1]
    m = store.manifest()
    assert m["rows"] == {"input": len(x), "encoded": len(x), "rejected": 0}
    assert m["parent"] is None and m["input"]["dim"] == x.shape[1]
    vdir = Path(store.version_dir(res.version_id))
    for entry in m["files"]:  # every listed file exists with the recorded checksum
        data = (vdir / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert not (vdir / "_staging").exists()
    t = store.read_data()
    assert t.num_rows == len(x)
    assert set(t.column_names) >= {"item_id", "codes", "sid", "sid_layers", "suffix", "qerr"}
    assert sorted(t.column("item_id").to_pylist()) == list(range(len(x)))
    # second build records its parent
    res2 = build(small_config(catalog, root), log=quiet)
    assert store.manifest(res2.version_id)["parent"] == res.version_id


def test_the_settings_of_parallelism_leave_the_sids_as_they_are(small_catalog, root):
    """README's seed row: the same SIDs whatever encode.shard_rows, encode.chunk_rows,
    driver.gather_rows (200: duplicates checked in hash buckets, the capacity moves in
    prefix ranges and the suffixes ranked through staging), with a sampled fit (1,500 of
    2,400 rows) and the capacity bound moving items (fit.num_workers: the Ray tests)."""
    catalog, x = small_catalog
    settings = [{}, {"encode__shard_rows": 300, "encode__chunk_rows": 128},
                {"encode__shard_rows": 2400, "driver__gather_rows": 200}]
    tables = []
    for over in settings:
        res = build(small_config(catalog, root, collisions__max_per_sid=4, **over),
                    log=lambda msg: None)
        assert res.metrics["collisions"]["reassigned"] > 0
        table = TableStore(root, "sids").read_data(res.version_id).sort_by("item_id")
        tables.append(table.select(["item_id", "codes", "sid", "sid_layers", "suffix"]))
    assert tables[0].num_rows == len(x)
    assert tables[1].equals(tables[0]) and tables[2].equals(tables[0])


def test_embeddings_far_from_the_origin_for_their_spread_are_warned_of(tmp_path, root):
    """float32 distances (||x||^2 - 2 x.c + ||c||^2) lose the codes' differences when the
    rows sit far from the origin for their spread: the build says so, and how to mend it."""
    from semid_dist.codebooks import far_from_origin

    base = clustered(3000, 32, seed=2)
    far = (base * 0.01 + 100).astype(np.float32)
    assert far_from_origin(base) is None and far_from_origin(np.ones((50, 4), np.float32)) is None
    demo = pq.read_table(DEMO, columns=["embedding"]).column("embedding")
    assert far_from_origin(np.array(demo.to_pylist(), np.float32)) is None
    said = far_from_origin(far)
    assert said is not None and said.endswith("centre them (subtract the catalog's mean "
                                              "embedding) before the build")
    assert far_from_origin(base * 0.01 + np.float32(0.3)) is None  # (a modest offset)
    lines: list[str] = []
    build(small_config(write_catalog(tmp_path / "far", far), root), log=lines.append)
    assert [m for m in lines if m.startswith("warning: ")] == [f"warning: {said}"]


def test_a_one_layer_quantizer_builds(small_catalog, root):
    """One layer: SIDs of one token, no layer-to-layer flows (the build failed writing
    analytics/flows.parquet from no transitions)."""
    catalog, x = small_catalog
    res = build(small_config(catalog, root, quantizer__layers=[16]), log=quiet)
    store = TableStore(root, "sids")
    t = store.read_data(res.version_id)
    codes = np.array(t.column("codes").to_pylist())
    assert t.num_rows == len(x) and codes.shape == (len(x), 1) and codes.max() < 16
    assert np.array_equal(np.array(t.column("sid").to_pylist()), codes)
    flows = pq.read_table(Path(store.version_dir(res.version_id)) / "analytics" / "flows.parquet")
    assert flows.num_rows == 0 and flows.column_names == ["to_layer", "parent", "child", "items"]
    assert res.metrics["layers"][0]["used"] == len(np.unique(codes))


def test_local_engine_reads_each_next_shard_in_a_thread_ahead(small_catalog, root,
                                                              monkeypatch):
    """The local engine reads every shard in its reading thread, one shard ahead and in
    order, the worker takes each read over (nothing is read twice or left behind), and the
    table is the one a worker reading its own shards writes."""
    import threading

    from semid_dist.stages import EncodeWorker

    catalog, _ = small_catalog
    reads: list[tuple[int, str]] = []
    calls: list[int] = []
    workers: list[EncodeWorker] = []
    read_ahead, call = EncodeWorker.read_ahead, EncodeWorker.__call__

    def recorded_read(self, shard):
        reads.append((shard.index, threading.current_thread().name))
        read_ahead(self, shard)

    def recorded_call(self, shard):
        calls.append(shard.index)
        workers.append(self)
        out = call(self, shard)
        # the next shard's read starts before the engine has this call's result back (a
        # read after each result would only start once the generator resumes, after this)
        if shard.index < 5:
            deadline = time.monotonic() + 30
            while shard.index + 1 not in [i for i, _ in reads] and time.monotonic() < deadline:
                time.sleep(0.001)
            assert shard.index + 1 in [i for i, _ in reads]
        return out

    monkeypatch.setattr(EncodeWorker, "read_ahead", recorded_read)
    monkeypatch.setattr(EncodeWorker, "__call__", recorded_call)
    ahead = build(small_config(catalog, root), log=quiet)
    assert calls == list(range(6))  # 2 files of 1,200 rows: shards of 500, 500 and 200 each
    assert [i for i, _ in reads] == calls
    assert all(name.startswith("semid-read") for _, name in reads)
    assert not workers[-1]._ahead
    # the reference: each shard read by the call itself (reads still recorded)
    monkeypatch.setattr(EncodeWorker, "__call__", call)
    monkeypatch.setattr(LocalEngine, "encode", lambda self, ctx, shards: map(
        EncodeWorker(ctx), shards))
    reads.clear()
    plain = build(small_config(catalog, root), log=quiet)
    assert not reads
    store = TableStore(root, "sids")
    assert sorted_table(store, ahead.version_id).equals(sorted_table(store, plain.version_id))


def test_same_seed_gives_identical_sid_tables(small_catalog, root):
    catalog, _ = small_catalog
    a = build(small_config(catalog, root), log=quiet)
    b = build(small_config(catalog, root), log=quiet)
    store = TableStore(root, "sids")
    assert a.version_id != b.version_id
    assert sorted_table(store, a.version_id).equals(sorted_table(store, b.version_id))
    c = build(small_config(catalog, root, seed=8), log=quiet)
    assert not sorted_table(store, a.version_id).equals(sorted_table(store, c.version_id))
    # the encode workers' allocator setting changes no byte of the table or its figures
    d = build(small_config(catalog, root, encode__reuse_memory=False), log=quiet)
    assert sorted_table(store, a.version_id).equals(sorted_table(store, d.version_id))
    figures = [{k: v for k, v in store.read_json(vid, "metrics.json").items()
                if k != "timings"} for vid in (a.version_id, d.version_id)]
    assert figures[0] == figures[1]


def _brute_metrics(codes: np.ndarray, x: np.ndarray, sizes: list[int]) -> dict:
    n = len(codes)
    out = {"layers": []}
    for layer, size in enumerate(sizes):
        cnt = Counter(codes[:, layer].tolist())
        c = np.array([cnt.get(t, 0) for t in range(size)], dtype=float)
        p = c[c > 0] / n
        ent = -sum(pi * math.log(pi) for pi in p)
        mad = np.abs(c[:, None] - c[None, :]).sum()
        out["layers"].append({"used": int((c > 0).sum()), "entropy": ent,
                              "entropy_norm": ent / math.log(size),
                              "gini": mad / (2 * size * size * c.mean()),
                              "top_share": c.max() / n})
    sids = Counter(map(tuple, codes.tolist()))
    out["unique_sid_rate"] = sum(1 for s in map(tuple, codes.tolist()) if sids[s] == 1) / n
    out["max_items_per_sid"] = max(sids.values())
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(codes[:, :2].tolist()):
        groups.setdefault(tuple(row), []).append(i)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sc = []
    for members in groups.values():
        if len(members) >= 2:
            g = u[members]
            cos = g @ g.T
            m = len(members)
            sc.append((cos.sum() - np.trace(cos)) / (m * m - m))
    out["sc"] = float(np.mean(sc))
    return out


@pytest.mark.parametrize("popularity", [None, "popularity"])
def test_metrics_match_brute_force_from_written_table(small_catalog, root, popularity):
    """With a popularity column the shards send head and tail statistics only; the whole
    catalog's figures are their merge and still match the brute force over every row."""
    catalog, x = small_catalog
    cfg = small_config(catalog, root, input__popularity_column=popularity)
    res = build(cfg, log=quiet)
    store = TableStore(root, "sids")
    t = sorted_table(store, res.version_id)
    codes = np.array(t.column("codes").to_pylist())
    metrics = store.read_json(None, "metrics.json")
    sizes = list(cfg.quantizer.layers)
    brute = _brute_metrics(codes, x, sizes)
    assert len(metrics["layers"]) == len(brute["layers"]) == len(sizes)
    for got, want in zip(metrics["layers"], brute["layers"]):
        assert got["used"] == want["used"]
        for key in ("entropy", "entropy_norm", "gini", "top_share"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert metrics["collisions"]["unique_sid_rate"] == pytest.approx(brute["unique_sid_rate"])
    assert metrics["collisions"]["max_items_per_sid"] == brute["max_items_per_sid"]
    assert metrics["quality"]["semantic_cohesion"] == pytest.approx(brute["sc"], rel=1e-6)
    ctx = JobContext(catalog_url=catalog, id_column="item_id", embedding_column="embedding",
                     popularity_column=None, dim=x.shape[1], sizes=tuple(sizes), root=root,
                     table="sids", version_id=res.version_id, quality_depth=2)
    recon = decode(load_codebooks(ctx), codes)
    err = ((x.astype(np.float64) - recon) ** 2).sum(1)
    assert metrics["reconstruction"]["mse"] == pytest.approx(err.mean(), rel=1e-4)
    np.testing.assert_allclose(t.column("qerr").to_numpy(), err, rtol=1e-3, atol=1e-4)
    assert set(metrics) >= {"rows", "layers", "prefixes", "collisions", "reconstruction",
                            "quality", "pruning"}
    assert set(metrics["collisions"]["items_per_sid_quantiles"]) == {"0.8", "0.9", "0.99",
                                                                     "0.999"}
    sids = [tuple(s) for s in t.column("sid_tokens").to_pylist()]
    table_counts = Counter(sids)
    if popularity:  # item_id i has popularity i % 97 (conftest.write_catalog)
        pop = t.column("item_id").to_numpy() % 97
        head = pop >= head_threshold(pop.astype(np.float64), cfg.metrics.head_share)
        assert 0 < head.sum() < len(x)
        for part, rows in (("head", head), ("tail", ~head)):
            want = _brute_metrics(codes[rows], x[t.column("item_id").to_numpy()[rows]], sizes)
            assert metrics[part]["items"] == rows.sum()
            assert [g["used"] for g in metrics[part]["layers"]] == \
                [w["used"] for w in want["layers"]]
            assert metrics[part]["quality"]["semantic_cohesion"] == pytest.approx(want["sc"],
                                                                                rel=1e-6)
            # its collisions are with any item of the table, not only with the part's items
            held = Counter(sids[i] for i in np.flatnonzero(rows))
            got = metrics[part]["collisions"]
            assert got["distinct_sids"] == len(held)
            assert got["unique_sid_rate"] == pytest.approx(
                np.mean([table_counts[sids[i]] == 1 for i in np.flatnonzero(rows)]))
            assert got["max_items_per_sid"] == max(table_counts[s] for s in held)
            assert got["mean_items_per_sid"] == pytest.approx(
                np.mean([table_counts[s] for s in held]))
        assert sum(metrics[p]["collisions"]["unique_sid_rate"] * metrics[p]["items"]
                   for p in ("head", "tail")) == pytest.approx(
            metrics["collisions"]["unique_sid_rate"] * len(x))
    else:
        assert "head" not in metrics and "tail" not in metrics


def test_collision_suffixes_are_unique_and_ordered(small_catalog, root):
    catalog, _ = small_catalog
    res = build(small_config(catalog, root, quantizer__layers=[4, 4]), log=quiet)
    t = TableStore(root, "sids").read_data(res.version_id).to_pandas()
    t["key"] = t["sid"].map(tuple)
    assert not t.duplicated(["key", "suffix"]).any()
    assert (t.groupby("key").size() > 1).any()  # there are collisions to resolve
    for _, g in t.groupby("key"):
        g = g.sort_values("suffix")
        assert list(g["suffix"]) == list(range(len(g)))
        order = g.sort_values(["qerr", "item_id"])
        assert list(order["suffix"]) == list(range(len(g)))


@pytest.mark.parametrize("bucket_rows", [30, 1000])
def test_collisions_ranked_in_key_ranges_match_ranking_on_the_driver(small_catalog, root,
                                                                     bucket_rows):
    """More colliding items than driver.gather_rows: tasks rank them in key ranges
    through the version's staging (30: one split task per shard, ranges smaller than some
    SIDs; 1000: split tasks of two shards) and write the same table."""
    catalog, _ = small_catalog
    store = TableStore(root, "sids")
    whole = build(small_config(catalog, root), log=quiet)
    t = sorted_table(store, whole.version_id)
    sids = Counter(map(tuple, t.column("sid").to_pylist()))
    hot = sum(n for n in sids.values() if n > 1)
    assert hot > bucket_rows and max(sids.values()) > 30 and max(t["suffix"].to_pylist()) > 0
    logs: list[str] = []
    ranged = build(small_config(catalog, root, driver__gather_rows=bucket_rows),
                   log=logs.append)
    assert sorted_table(store, ranged.version_id).equals(t)
    ranges = -(-hot // bucket_rows)
    splits = {30: 6, 1000: 3}[bucket_rows]  # 6 shards: 500 / 500 / 200 rows in each file
    assert any(f"ranking {hot} colliding items in {ranges} key ranges ({splits} split tasks"
               in m for m in logs)
    assert not Path(store.version_dir(ranged.version_id), STAGING).exists()


def test_bad_rows_are_rejected_with_reasons_and_counts_reconcile(tmp_path, root):
    x = clustered(600, 6, seed=2)
    rows = [list(map(float, r)) for r in x]
    ids: list = list(range(600))
    rows[3][1] = float("nan")
    rows[4][0] = float("inf")
    rows[5] = None
    rows[6] = rows[6][:4]
    ids[7] = None
    ids[9] = 8  # duplicate id: both copies rejected
    path = tmp_path / "bad"
    path.mkdir()
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()),
                             "embedding": pa.array(rows, pa.list_(pa.float32()))}),
                   path / "part-0.parquet", row_group_size=200)
    cfg = small_config(str(path), root, input__max_reject_fraction=0.05,
                       quantizer__layers=[8, 4], fit__sample_size=600)
    res = build(cfg, log=quiet)
    m = TableStore(root, "sids").manifest()
    assert m["rows"] == {"input": 600, "encoded": 593, "rejected": 7}
    rej = TableStore(root, "sids").read_data(res.version_id, kind="rejects").sort_by("row")
    assert rej.column("row").to_pylist() == [3, 4, 5, 6, 7, 8, 9]
    reasons = rej.column("reason").to_pylist()
    assert "NaN" in reasons[0] and "NaN/Inf" in reasons[1] and reasons[2] == "null embedding"
    assert "dim 4 != 6" in reasons[3] and reasons[4] == "null item_id"
    assert reasons[5] == reasons[6] == "duplicate item_id"
    assert all(f.endswith("part-0.parquet") for f in rej.column("source_file").to_pylist())
    with pytest.raises(InputError, match="1 item id occurs more than once"):
        build(small_config(str(path), root, input__on_bad_rows="fail",
                           quantizer__layers=[8, 4]), log=quiet)


def test_failed_build_leaves_previous_version_untouched(small_catalog, tmp_path, root):
    catalog, _ = small_catalog
    first = build(small_config(catalog, root), log=quiet)
    store = TableStore(root, "sids")
    before = sorted_table(store, first.version_id)
    x = clustered(600, 12, seed=3)
    x[::3, 0] = np.nan  # a third of the rows are bad: over max_reject_fraction
    bad = write_catalog(tmp_path / "mostly_bad", x)
    with pytest.raises(InputError, match="max_reject_fraction"):
        build(small_config(bad, root, quantizer__layers=[8, 4]), log=quiet)
    assert store.latest() == first.version_id
    assert store.versions() == [first.version_id]
    assert sorted_table(store, first.version_id).equals(before)


def test_catalog_smaller_than_codebook_is_a_clear_error(tmp_path, root):
    cat = write_catalog(tmp_path / "tiny", clustered(10, 4, seed=0))
    with pytest.raises(InputError, match=r"the catalog holds 10 rows, fewer than the "
                                         r"largest codebook's 16 codes .*; use smaller "
                                         r"quantizer\.layers"):
        build(small_config(cat, root), log=quiet)
    assert TableStore(root, "sids").latest() is None
    x = clustered(100, 4, seed=0)
    x[:, 0] = np.nan  # every row bad: the message counts them instead of blaming the sizes
    cat = write_catalog(tmp_path / "all_bad", x)
    with pytest.raises(InputError, match=r"holds 0 valid rows, fewer than the largest codebook "
                                         r"\(16\); 100 of the 100 rows it drew are bad "
                                         r"\(100 non-finite values \(NaN/Inf\) in embedding: "
                                         r"rows the encode rejects, see README's Bad input\); "
                                         r"fix the catalog's bad rows$"):
        build(small_config(cat, root), log=quiet)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")
@pytest.mark.parametrize("stage", ["fit", "encode"])
def test_gpu_setting_without_a_gpu_is_a_clear_error_before_any_work(small_catalog, root,
                                                                        stage):
    logs: list[str] = []
    with pytest.raises(ConfigError, match=f"{stage}.use_gpu=true but no CUDA device"):
        build(small_config(small_catalog[0], root, **{f"{stage}__use_gpu": True}),
              log=logs.append)
    store = TableStore(root, "sids")
    assert store.latest() is None and store.version_dirs() == []  # nothing written
    assert logs == []  # no plan, sample, fit or encode


def test_sample_is_seeded_and_bounded(small_catalog):
    from semid_dist.io.catalog import plan_catalog

    plan = plan_catalog(small_catalog[0], target_rows=500)
    a = choose_sample(plan, 700, 1)
    assert sum(len(v) for v in a.values()) == 700
    b = choose_sample(plan, 700, 1)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for idx, rows in a.items():
        assert rows.max() < plan.shards[idx].num_rows
    assert sum(len(v) for v in choose_sample(plan, 10**9, 1).values()) == plan.num_rows


def test_encode_reuses_codebooks_and_checks_dimension(small_catalog, tmp_path, root):
    catalog, x = small_catalog
    first = build(small_config(catalog, root), log=quiet)
    second = build(small_config(catalog, root, encode__from_version="latest"), log=quiet)
    store = TableStore(root, "sids")
    assert sorted_table(store, first.version_id).equals(sorted_table(store, second.version_id))
    assert second.metrics["fit"]["codebooks_from"] == first.version_id
    other = write_catalog(tmp_path / "d5", clustered(300, 5, seed=0))
    with pytest.raises(InputError, match=r"embedding dim 5 != codebook dim 12 \(codebooks of "
                       rf"version {first.version_id}, encode.from_version\): encode with "
                       "codebooks fitted on 5-dim embeddings, or fit new ones"):
        build(small_config(other, root, encode__from_version=first.version_id), log=quiet)
    with pytest.raises(ConfigError, match="quantizer.layers"):
        build(small_config(catalog, root, encode__from_version="latest",
                           quantizer__layers=[8, 8]), log=quiet)
    # checked before the build starts a version: nothing is written
    assert store.uncommitted() == [] and store.versions() == [first.version_id,
                                                              second.version_id]
    lines: list[str] = []  # a warm start asked for beside reused codebooks is said to do nothing
    build(small_config(catalog, root, encode__from_version="latest", fit__warm_start="parent"),
          log=lines.append)
    assert f"codebooks: reusing version {second.version_id} ([16, 8, 8]); fit.warm_start=parent " \
        "has no effect: nothing is fit" in lines, lines


def test_bf16_encode_of_the_same_codebooks_keeps_nearly_every_code(small_catalog, root):
    catalog, _ = small_catalog
    first = build(small_config(catalog, root), log=quiet)
    fast = build(small_config(catalog, root, encode__from_version=first.version_id,
                              encode__precision="bf16"), log=quiet)
    store = TableStore(root, "sids")
    a, b = sorted_table(store, first.version_id), sorted_table(store, fast.version_id)
    assert a.column("item_id").equals(b.column("item_id"))
    codes_a = np.array(a.column("codes").to_pylist())
    codes_b = np.array(b.column("codes").to_pylist())
    assert (codes_a == codes_b).all(axis=1).mean() >= 0.999
    assert store.manifest(fast.version_id)["config"]["encode"]["precision"] == "bf16"


def test_cli_build_versions_and_errors(small_catalog, tmp_path, capsys):
    catalog, _ = small_catalog
    root = str(tmp_path / "cli")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"engine": "local", "input": {"path": catalog},
                               "output": {"root": root, "table": "t"},
                               "quantizer": {"layers": [8, 8], "niter": 4},
                               "fit": {"sample_size": 1000}}))
    assert main(["build", "--config", str(cfg), "--json", "seed=3"]) == 0
    out = json.loads(capsys.readouterr().out)  # progress goes to stderr: stdout is pure JSON
    assert out["metrics"]["rows"]["encoded"] == 2400
    assert main(["versions", "list", "--root", root, "--table", "t", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["version_id"] for v in listed] == [out["version_id"]] and listed[0]["latest"]
    assert main(["versions", "show", "--root", root, "--table", "t"]) == 0
    assert out["version_id"] in capsys.readouterr().out
    assert main(["build", "--config", str(cfg), "fit.sampel_size=3"]) == 2
    err = capsys.readouterr().err
    assert "fit.sampel_size" in err and err.count("\n") == 1
    assert main(["validate", *map(str, sorted((REPO / "conf").glob("*.yaml")))]) == 0


def test_local_build_runs_with_ray_unimportable(small_catalog, tmp_path):
    catalog, _ = small_catalog
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "sys.modules['pyspark'] = None\n"
        "from semid_dist.config import parse_config\n"
        "from semid_dist.pipeline import build\n"
        f"cfg = parse_config({{'engine': 'local', 'input': {{'path': {catalog!r}}},"
        f" 'output': {{'root': {str(tmp_path / 'noray')!r}}},"
        " 'quantizer': {'layers': [8, 8], 'niter': 3}, 'fit': {'sample_size': 500}})\n"
        "print(build(cfg, log=lambda m: None).manifest['rows']['encoded'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "2400"


def test_every_catalog_file_schema_is_checked_before_running(small_catalog, tmp_path, root):
    catalog, _ = small_catalog
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in sorted(Path(catalog).glob("*.parquet")):
        (mixed / f.name).write_bytes(f.read_bytes())
    pq.write_table(pa.table({"item_id": pa.array([10**6], pa.int64()),
                             "embedding": pa.array([["a", "b"]], pa.list_(pa.string()))}),
                   mixed / "part-999.parquet")
    with pytest.raises(InputError, match=r"part-999\.parquet: column 'embedding' \(set by "
                                         r"input\.embedding_column\) has type"):
        build(small_config(str(mixed), root), log=quiet)
    assert not Path(root).exists() or TableStore(root, "sids").latest() is None


class _Carrying(LocalEngine):
    """The local engine, recording what its encode hands the driver; `lose` deletes a
    finished shard's staged result before the driver's turn for it comes, `drop` leaves a
    shard's result out of what the encode hands over, `repeat` hands it over twice."""

    def __init__(self, cfg, log=print, *, lose: int | None = None, drop: int | None = None,
                 repeat: int | None = None) -> None:
        super().__init__(cfg, log)
        self.results: list[dict] = []
        self.lose, self.drop, self.repeat = lose, drop, repeat

    def encode(self, ctx, shards):
        for res in super().encode(ctx, shards):
            if res["index"] == self.drop:
                continue
            if res["index"] == self.repeat:
                yield dict(res)
            self.results.append(res)
            if res["index"] == self.lose:
                ctx.store().fs.rm(fsio.join(ctx.store().version_dir(ctx.version_id),
                                            f"{STAGING}/result-{self.lose:06d}.bin"))
            yield res


def test_engines_carry_shard_counts_and_the_driver_reads_statistics_from_staging(
        small_catalog, root, monkeypatch):
    """A shard's statistics do not travel through the engine (Ray Data blocks, a Spark
    collect): the driver reads them from the shard's staged result at its turn. A result
    lost before then fails the build with a named error, and `_latest` stays put."""
    catalog, x = small_catalog
    cfg = small_config(catalog, root, input__popularity_column="popularity")
    engines = []

    def make(cfg, log=print, lose=None):
        engines.append(_Carrying(cfg, log, lose=lose))
        return engines[-1]

    monkeypatch.setattr("semid_dist.pipeline.make_engine", make)
    first = build(cfg, log=quiet)
    results = engines[-1].results
    assert sorted(r["index"] for r in results) == list(range(6))  # 500, 500, 200 per file
    assert all(not any(k.startswith("partial") for k in r) for r in results)
    assert sum(r["encoded"] for r in results) == len(x) == first.metrics["rows"]["encoded"]
    # the statistics were merged all the same: both halves of the popularity split
    assert first.metrics["head"]["items"] + first.metrics["tail"]["items"] == len(x)

    monkeypatch.setattr("semid_dist.pipeline.make_engine",
                        lambda cfg, log=print: make(cfg, log, lose=3))
    with pytest.raises(SemidError, match=r"staged result of shard 3 .*result-000003.bin.*"
                                         r"nothing was committed"):
        build(replace(cfg, seed=8), log=quiet)
    store = TableStore(root, "sids")
    assert store.latest() == first.version_id
    # the re-run resumes that version: it reuses shards 0-2 and encodes shard 3 (its file
    # was removed) and the two the failed run never reached
    monkeypatch.setattr("semid_dist.pipeline.make_engine", make)
    again = build(replace(cfg, seed=8), log=quiet)
    assert [r["index"] for r in engines[-1].results] == [3, 4, 5]
    assert store.latest() == again.version_id != first.version_id
    assert again.metrics["rows"]["encoded"] == len(x)


@pytest.mark.parametrize("fault, message", [
    ({"drop": 4}, r"returned no result for shard 4; nothing was committed"),
    ({"repeat": 2}, r"returned a result for shard 2 twice; nothing was committed"),
])
def test_a_shard_result_missing_or_twice_fails_the_build(small_catalog, root, monkeypatch,
                                                         fault, message):
    """The driver merges the statistics in shard order and counts each shard once: an
    engine whose encode ends without one shard's result, or hands one over twice, fails the
    build, naming the shard, and commits nothing."""
    catalog, _ = small_catalog
    cfg = small_config(catalog, root)
    first = build(cfg, log=quiet)
    monkeypatch.setattr("semid_dist.pipeline.make_engine",
                        lambda cfg, log=print: _Carrying(cfg, log, **fault))
    with pytest.raises(SemidError, match=message):
        build(replace(cfg, seed=8), log=quiet)
    assert TableStore(root, "sids").latest() == first.version_id


def test_step_clock_laps_and_the_log_line(monkeypatch):
    """Each lap is the time since the one before; a step timed twice adds up; the log line
    gives each step's mean per shard and share of the workers' time, in the steps' order."""
    ticks = iter([10.0, 10.5, 10.75, 12.0])  # the clock's start, then each lap's reading
    monkeypatch.setattr("semid_dist.stages.time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    clock = StepClock()
    clock.lap("read")
    clock.lap("validate")
    clock.lap("read")
    assert clock.seconds == {"read": 0.5 + 1.25, "validate": 0.25}
    assert list(clock.seconds) == ["read", "validate"]
    text = steps_text({"read": 0.3, "quantize": 0.9, "result": 0.0}, shards=3)
    assert text == "read 100 ms (25%), quantize 300 ms (75%), result 0 ms (0%)"


def test_work_files_that_cannot_be_removed_after_the_commit_leave_it_standing(
        small_catalog, root, monkeypatch):
    """A failure to remove the staging once the manifest is written (an object store's error,
    or a gc that took the build for gone removing it too) is logged; the build returns its
    committed version (it raised, though committed). Removing a folder that is gone
    meanwhile is no error."""
    store = TableStore(root, "sids")
    first = build(small_config(small_catalog[0], root), log=quiet)
    store.remove_staging(first.version_id)  # gone already: nothing to do, no error

    def unremovable(self, vid):
        raise PermissionError(13, "Permission denied", "_staging")

    monkeypatch.setattr(TableStore, "remove_staging", unremovable)
    logs: list[str] = []
    res = build(small_config(small_catalog[0], root, seed=8), log=logs.append)
    assert store.latest() == res.version_id and store.manifest(res.version_id)
    assert any(m.startswith(f"commit: the work files (_staging) of version {res.version_id} "
                            "stay (") for m in logs), logs
    assert logs[-1].startswith(f"commit: version {res.version_id} committed in ")


def test_ctrl_c_once_the_manifest_is_written_says_the_version_stands(small_catalog, tmp_path,
                                                                     monkeypatch, capsys):
    """A Ctrl-C while `_latest` moves (the manifest written) or while the staging goes: the
    version is committed, and the CLI says so instead of "nothing was committed"."""
    root = tmp_path / "out"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps({"engine": "local", "seed": 7,
                                    "input": {"path": small_catalog[0]},
                                    "output": {"root": str(root), "table": "sids"},
                                    "quantizer": {"layers": [16, 8], "niter": 4},
                                    "fit": {"sample_size": 1500}}))

    def ctrl_c(self, version_id, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(TableStore, "advance_latest", ctrl_c)
    assert main(["build", "--config", str(cfg_path)]) == 130
    store = TableStore(str(root), "sids")
    [vid] = store.versions()  # committed; `_latest` not moved, so "latest" is the newest
    assert capsys.readouterr().err.strip().endswith(
        f"semid build: interrupted after version {vid} was committed")
    monkeypatch.undo()
    monkeypatch.setattr(TableStore, "remove_staging", ctrl_c)
    assert main(["build", "--config", str(cfg_path)]) == 130
    newer = store.versions()[-1]
    assert newer != vid and store.latest() == newer
    assert f"interrupted after version {newer} was committed" in capsys.readouterr().err


@pytest.mark.parametrize("string_ids", [False, True])
def test_a_fit_sampled_by_item_id_does_not_depend_on_the_rows_order(tmp_path, string_ids):
    """fit.sample_by: id draws the fit sample by a seeded hash of the item ids and orders it
    so: the same items in another order, other files and row groups give the same SIDs, bad
    rows and a rejected duplicate id included (by row position, the default, every SID
    changed); another seed, another sample."""
    from semid_dist.codebooks import hash_bound

    x = clustered(2400, 12, seed=1)
    x[[5, 900]] = np.nan
    ids = np.arange(len(x), dtype=np.int64)
    ids[1700] = 40  # a duplicate id: both copies rejected
    ids = ids.astype(str).astype(object) if string_ids else ids
    popularity = np.arange(len(x)) % 97  # each row keeps its own
    order = np.random.default_rng(5).permutation(len(x))
    catalog = write_catalog(tmp_path / "catalog", x, ids=ids, popularity=popularity, files=2)
    shuffled = write_catalog(tmp_path / "shuffled", x[order], ids=ids[order],
                             popularity=popularity[order], files=3, row_group_rows=300)

    def sids(path, table, **over):
        res = build(small_config(path, str(tmp_path / "out"), output__table=table, **over),
                    log=quiet)
        assert res.manifest["rows"] == {"input": 2400, "encoded": 2396, "rejected": 4}
        return TableStore(str(tmp_path / "out"), table).read_data(res.version_id).sort_by(
            "item_id")

    by_id = sids(catalog, "a", fit__sample_by="id")
    assert sids(shuffled, "b", fit__sample_by="id").equals(by_id)
    by_position = [sids(path, t) for path, t in ((catalog, "c"), (shuffled, "d"))]
    assert not by_position[0].column("codes").equals(by_position[1].column("codes"))
    assert not sids(catalog, "e", fit__sample_by="id", seed=8).column("codes").equals(
        by_id.column("codes"))
    assert hash_bound(10**9, 10) == hash_bound(10, 10) == 2**64 - 1  # every row
    assert hash_bound(1500, 2400) / 2**64 == pytest.approx((1500 + 6 * 1500**0.5 + 10) / 2400)
