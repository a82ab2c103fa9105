"""Pruning, collisions and lookups, end to end on the local engine, checked on the written
tables against brute-force recomputation from the raw codes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from semid_dist.codes.pruning import token_offsets
from semid_dist.engines.local import LocalEngine
from semid_dist.io.store import FileEntry, TableStore
from semid_dist.pipeline import build
from semid_dist.quantize import decode
from semid_dist.sid_items import key_radix, sid_items_lookup
from semid_dist.stages import JobContext, load_codebooks
from semid_dist.summary import format_summary
from tests.conftest import REPO, small_config

LAYERS = [16, 8, 8]


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def fitted(small_catalog, tmp_path_factory):
    """One fitted version; every strategy below re-encodes with its codebooks."""
    catalog, x = small_catalog
    root = str(tmp_path_factory.mktemp("prune"))
    res = build(small_config(catalog, root), log=quiet)
    return catalog, x, root, res.version_id


def encode_with(fitted, log=quiet, **over):
    catalog, _, root, vid = fitted
    res = build(small_config(catalog, root, encode__from_version=vid, **over), log=log)
    table = TableStore(root, "sids").read_data(res.version_id).sort_by("item_id").to_pandas()
    return res, table


def sids(table) -> list[tuple]:
    return [tuple(s) for s in table["sid"]]


def check_invariants(table, n_items: int) -> None:
    assert len(table) == n_items and table["item_id"].is_unique  # no item lost
    keys = [(tuple(layers), tuple(s), suf) for layers, s, suf in
            zip(table["sid_layers"], table["sid"], table["suffix"])]
    assert len(set(keys)) == len(keys)  # (sid, suffix) unique
    for codes, sid, layers in zip(table["codes"], table["sid"], table["sid_layers"]):
        assert list(sid) == [codes[i] for i in layers]


def layer_figures(tokens: list[int], size: int) -> dict:
    """A layer's token figures by brute force: its tokens' share of the items holding one."""
    cnt = Counter(tokens)
    c = np.array([cnt.get(t, 0) for t in range(size)], dtype=float)
    p = c[c > 0] / c.sum()
    return {"used": int((c > 0).sum()), "entropy": float(-(p * np.log(p)).sum()),
            "gini": float(np.abs(c[:, None] - c[None, :]).sum() / (2 * size * size * c.mean())),
            "top_share": float(c.max() / c.sum())}


def collision_figures(keys: list[tuple]) -> dict:
    per = Counter(keys)
    return {"distinct_sids": len(per), "max_items_per_sid": max(per.values()),
            "unique_sid_rate": sum(per[k] == 1 for k in keys) / len(keys)}


def check_pruning_figures(metrics: dict, t) -> None:
    """metrics.json's pruning and collision figures against the written table: items
    pruned, mean SID length, each layer's tokens after pruning, and the collisions of the
    final SIDs (sid_tokens) and of the raw codes (before)."""
    lengths = [len(layers) for layers in t["sid_layers"]]
    pruning = metrics["pruning"]
    assert pruning["items_pruned"] == sum(n < len(LAYERS) for n in lengths)
    assert pruning["mean_sid_length"] == pytest.approx(np.mean(lengths))
    assert len(pruning["layers_after"]) == len(LAYERS)
    for layer, (got, size) in enumerate(zip(pruning["layers_after"], LAYERS)):
        kept = [c[layer] for c, layers in zip(t["codes"], t["sid_layers"]) if layer in layers]
        if not kept:
            assert got["used"] == 0
            continue
        want = layer_figures(kept, size)
        assert got["used"] == want["used"]
        for key in ("entropy", "gini", "top_share"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (layer, key)
    for name, keys in (("collisions", [tuple(s) for s in t["sid_tokens"]]),
                       ("collisions_before", [tuple(c) for c in t["codes"]])):
        want = collision_figures(keys)
        assert {k: metrics[name][k] for k in want} == pytest.approx(want), name


def test_top_k_zero_equals_none(fitted):
    _, none = encode_with(fitted)
    _, k0 = encode_with(fitted, prune__strategy="top_k", prune__k=0)
    assert sids(none) == sids(k0) and list(none["suffix"]) == list(k0["suffix"])
    check_invariants(none, len(fitted[1]))


def test_drop_layer_equals_removing_layer_from_every_sid(fitted):
    res, t = encode_with(fitted, prune__strategy="drop_layer")
    check_invariants(t, len(fitted[1]))
    assert sids(t) == [(c[0], c[2]) for c in t["codes"]]
    assert all(list(layers) == [0, 2] for layers in t["sid_layers"])
    assert res.metrics["pruning"]["layers_after"][1]["used"] == 0
    check_pruning_figures(res.metrics, t)


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_prunes_the_k_most_frequent_layer_2_tokens(fitted, k):
    res, t = encode_with(fitted, prune__strategy="top_k", prune__k=k)
    check_invariants(t, len(fitted[1]))
    counts = Counter(c[1] for c in t["codes"])
    ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))[:k]
    for codes, layers in zip(t["codes"], t["sid_layers"]):
        assert (1 not in list(layers)) == (codes[1] in ranked)
    assert res.metrics["pruning"]["pruned_tokens"] == k
    check_pruning_figures(res.metrics, t)


def test_mass_prunes_fewest_tokens_reaching_share(fitted):
    p = 0.3
    res, t = encode_with(fitted, prune__strategy="mass", prune__p=p)
    check_pruning_figures(res.metrics, t)
    counts = Counter(c[1] for c in t["codes"])
    ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))
    share, want = 0.0, set()
    for tok in ranked:
        if share >= p:
            break
        want.add(tok)
        share += counts[tok] / len(t)
    pruned = {c[1] for c, layers in zip(t["codes"], t["sid_layers"]) if 1 not in list(layers)}
    assert pruned == want


def test_sarq_stops_at_first_small_prefix(fitted):
    tau = 0.02
    res, t = encode_with(fitted, prune__strategy="sarq", prune__tau=tau)
    check_invariants(t, len(fitted[1]))
    check_pruning_figures(res.metrics, t)
    text = format_summary(res.version_id, res.path, res.metrics, None)  # (no "0 tokens": sarq
    assert (f"pruning   sarq: {res.metrics['pruning']['items_pruned']} items shortened"  # cuts
            in text and "top_share  (of the full codes, before pruning)" in text)  # prefixes)
    codes = [tuple(c) for c in t["codes"]]
    n = len(codes)
    prefix_count = Counter(c[:d] for c in codes for d in range(1, 4))
    for c, sid in zip(codes, sids(t)):
        depth = next((d for d in (1, 2) if prefix_count[c[:d]] <= tau * n), 3)
        assert sid == c[:depth]


def test_suffixes_follow_qerr_then_item_id(fitted):
    _, t = encode_with(fitted, prune__strategy="drop_layer")
    t["key"] = [tuple(s) for s in t["sid"]]
    collided = 0
    for _, g in t.groupby("key"):
        order = g.sort_values(["qerr", "item_id"])
        assert list(order["suffix"]) == list(range(len(g)))
        collided += len(g) > 1
    assert collided > 0


def test_capacity_bound_is_respected_and_moves_are_next_best(fitted):
    catalog, x, root, vid = fitted
    logs: list[str] = []
    res, t = encode_with(fitted, logs.append, collisions__max_per_sid=1,
                         collisions__candidates=8)
    _, free = encode_with(fitted)
    check_invariants(t, len(x))
    counts = Counter(sids(t))
    moved = res.metrics["collisions"]["reassigned"]
    assert moved > 0
    # every SID within capacity unless no candidate had room (then suffixes disambiguate),
    # and those said: in metrics, the summary and the report (nothing said it before)
    assert res.metrics["collisions"]["max_items_per_sid"] == max(counts.values())
    over = {s: c for s, c in counts.items() if c > 1}
    left = {"sids": len(over), "items": sum(c - 1 for c in over.values()), "pruned_sids": 0,
            "pruned_items": 0}
    assert res.metrics["collisions"]["over_capacity"] == left and left["sids"] > 0
    assert (f"capacity  at most 1 per SID: {moved} items moved to a next-best code, "
            f"{left['items']} items in {left['sids']} SIDs over it (no candidate code had "
            "room)") in format_summary(res.version_id, res.path, res.metrics, None)
    # candidates = the last layer's size: the advice is not "more candidates"
    assert (f"collisions: {moved} items moved to a next-best last-layer code (capacity 1 per "
            f"SID); {left['items']} items in {left['sids']} SIDs stay over it (no room in any "
            "of the last layer's 8 codes: a larger last layer or a larger bound place more)"
            ) in logs, logs
    assert res.metrics["quantizer"] == {"method": "rq_kmeans", "layers": LAYERS}
    assert "\nquantizer rq_kmeans 16 x 8 x 8\n" in format_summary(res.version_id, res.path,
                                                                 res.metrics, None)
    over_before = sum(c - 1 for c in Counter(sids(free)).values() if c > 1)
    assert sum(c - 1 for c in counts.values() if c > 1) < over_before
    changed = np.array([tuple(a) != tuple(b) for a, b in zip(t["codes"], free["codes"])])
    assert changed.sum() == moved
    for a, b in zip(t["codes"][changed], free["codes"][changed]):
        assert tuple(a[:-1]) == tuple(b[:-1])  # same prefix, only the last code moves
    ctx = JobContext(catalog_url=catalog, id_column="item_id", embedding_column="embedding",
                     popularity_column=None, dim=x.shape[1], sizes=tuple(LAYERS), root=root,
                     table="sids", version_id=vid, quality_depth=2)
    recon = decode(load_codebooks(ctx), np.array(t["codes"].tolist()))
    err = ((x.astype(np.float64) - recon) ** 2).sum(1)
    np.testing.assert_allclose(t["qerr"], err, rtol=1e-3, atol=1e-4)
    assert (t["qerr"][changed].values >= free["qerr"][changed].values - 1e-6).all()
    assert res.metrics["reconstruction"]["mse"] == pytest.approx(err.mean(), rel=1e-4)


def test_sids_pruning_cut_before_the_last_layer_are_counted_apart_from_the_bound(fitted):
    """drop_layer at the last layer under collisions.max_per_sid=1: no SID keeps a
    last-layer code, so the bound moves nothing; the SIDs over it are counted as pruned,
    not bounded (the summary said "none over it" beside max items/SID 40)."""
    res, t = encode_with(fitted, collisions__max_per_sid=1, prune__strategy="drop_layer",
                         prune__layer=2)
    check_invariants(t, len(fitted[1]))
    over = {s: c for s, c in Counter(sids(t)).items() if c > 1}
    assert over and all(len(s) == 2 for s in over)
    col = res.metrics["collisions"]
    assert col["reassigned"] == 0 and col["over_capacity"] == {
        "sids": 0, "items": 0, "pruned_sids": len(over),
        "pruned_items": sum(c - 1 for c in over.values())}
    assert (f"capacity  at most 1 per SID: 0 items moved to a next-best code, none over it; "
            f"{col['over_capacity']['pruned_items']} items past it in {len(over)} SIDs pruning "
            "cut before the last layer (not bounded)") in format_summary(
                res.version_id, res.path, res.metrics, None)


def test_capacity_bound_past_gather_rows_moves_the_same_items(fitted):
    """More rows of over-full SIDs than driver.gather_rows: tasks move them in prefix ranges
    through staging, and each shard reads its own moves by row: the same table and counts as
    moving them on the driver's rows, the residual sums up to the rounding of adding them
    range by range, and no scratch left."""
    catalog, _, root, vid = fitted
    opts = {"collisions__max_per_sid": 1, "collisions__candidates": 8}
    store = TableStore(root, "sids")
    logs: list[str] = []
    results = [build(small_config(catalog, root, encode__from_version=vid,
                                  driver__gather_rows=gather, **opts), log=logs.append)
               for gather in (10**6, 300)]
    ranged = [m for m in logs if m.startswith("collisions: moving the overflow of")]
    assert len(ranged) == 1 and "in 1 prefix ranges" not in ranged[0], ranged
    a, b = (store.read_data(r.version_id).sort_by("item_id") for r in results)
    assert a.num_rows == 2400 and a.equals(b)
    ma, mb = (r.metrics for r in results)
    assert ma["collisions"]["reassigned"] > 0
    for exact in ("collisions", "layers", "conditional", "pruning"):
        assert ma.get(exact) == mb.get(exact), exact
    for name in ("mse", "relative_error"):
        assert mb["reconstruction"][name] == pytest.approx(ma["reconstruction"][name],
                                                           rel=1e-12)
    assert not Path(store.version_dir(results[1].version_id), "_staging").exists()


def test_vocabulary_and_prefix_lookups(fitted):
    res, t = encode_with(fitted, prune__strategy="top_k", prune__k=2)
    vdir = TableStore(fitted[2], "sids").version_dir(res.version_id)
    vocab = pq.read_table(f"{vdir}/vocab.parquet").to_pandas()
    offsets = token_offsets(LAYERS)
    for tokens, sid, layers in zip(t["sid_tokens"], t["sid"], t["sid_layers"]):
        assert list(tokens) == [offsets[lay] + code for lay, code in zip(layers, sid)]
    codes = vocab[vocab["kind"] == "code"]
    assert list(codes["token_id"]) == list(range(sum(LAYERS)))
    usage = Counter(tok for tokens in t["sid_tokens"] for tok in tokens)
    assert dict(zip(codes["token_id"], codes["items"])) == {i: usage.get(i, 0)
                                                           for i in range(sum(LAYERS))}
    suffixes = vocab[vocab["kind"] == "suffix"]
    assert list(suffixes["code"]) == list(range(t["suffix"].max() + 1))
    held = Counter(t["suffix"])  # items holding each suffix token
    assert dict(zip(suffixes["code"], suffixes["items"])) == {
        s: held.get(s, 0) for s in range(t["suffix"].max() + 1)}
    assert held[1] > 0 and suffixes["items"].sum() == len(t)
    # past driver.gather_rows the suffixes are ranked by key-range tasks: the same counts
    ranked, _ = encode_with(fitted, prune__strategy="top_k", prune__k=2, driver__gather_rows=200)
    ranked_dir = TableStore(fitted[2], "sids").version_dir(ranked.version_id)
    assert pq.read_table(f"{ranked_dir}/vocab.parquet").to_pandas().equals(vocab)
    prefixes = pq.read_table(f"{vdir}/lookup/prefixes.parquet").to_pandas()
    got = {tuple(p): (n, c) for p, n, c in zip(prefixes["prefix_tokens"], prefixes["items"],
                                                prefixes["complete"])}
    seqs = [tuple(s) for s in t["sid_tokens"]]
    full = Counter(seqs)
    want = Counter(s[:d] for s in seqs for d in range(1, len(s) + 1))
    assert got == {p: (n, p in full) for p, n in want.items()}


def test_sid_to_items_lookup_lists_every_item_in_suffix_order(fitted):
    res, t = encode_with(fitted, prune__strategy="drop_layer")
    store = TableStore(fitted[2], "sids")
    parts = [e["path"] for e in res.manifest["files"]
             if e["path"].startswith("lookup/sid_items/")]
    assert parts
    lookup = pq.read_table([f"{store.version_dir(res.version_id)}/{p}" for p in parts]).to_pandas()
    got = {tuple(s): list(items) for s, items in zip(lookup["sid_tokens"], lookup["items"])}
    want: dict[tuple, list] = {}
    for tokens, item, _ in sorted(zip(map(tuple, t["sid_tokens"]), t["item_id"], t["suffix"]),
                                  key=lambda r: (r[0], r[2])):
        want.setdefault(tokens, []).append(item)
    assert got == want
    assert list(lookup["count"]) == [len(v) for v in lookup["items"]]
    assert [list(k) for k in lookup["suffixes"]] == [list(range(len(v))) for v in lookup["items"]]


def test_sid_to_items_lookup_split_into_buckets_is_the_same_lookup(fitted):
    """Several buckets (the data parts split by SID bucket through staging first) hold the
    same SID -> items rows as one bucket, each SID in one bucket; the split files are gone
    afterwards."""
    res, t = encode_with(fitted)
    store = TableStore(fitted[2], "sids")
    vid = res.version_id
    ctx = JobContext(catalog_url="unused", id_column="item_id", embedding_column="embedding",
                     popularity_column=None, dim=fitted[1].shape[1], sizes=tuple(LAYERS),
                     root=fitted[2], table="sids", version_id=vid, quality_depth=2)
    data = [FileEntry(**e) for e in res.manifest["files"] if e["path"].startswith("data/")]
    assert len(data) > 1

    def lookup(entries) -> dict[tuple, tuple[list, int]]:
        out = {}
        for e in entries:
            part = pq.read_table(store.entry_path(vid, e)).to_pylist()
            out.update({tuple(r["sid_tokens"]): (r["items"], r["count"]) for r in part})
        return out

    whole = sid_items_lookup(LocalEngine(small_config("unused", fitted[2])), ctx, data)
    assert len(whole) == 1
    want = lookup(whole)
    split = sid_items_lookup(LocalEngine(small_config("unused", fitted[2])), ctx, data,
                             bucket_rows=len(t) // 3)
    assert len(split) == 3
    assert sum(len(pq.read_table(store.entry_path(vid, e))) for e in split) == len(want)
    assert lookup(split) == want
    # layers whose SIDs do not fit one int64 key split their token lists instead (the data
    # parts' tokens all lie below these sizes, so the lookup is the same)
    wide = dataclasses.replace(ctx, sizes=(300,) * 8)
    assert key_radix(wide.sizes) is None and key_radix(ctx.sizes) == sum(LAYERS) + 1
    assert lookup(sid_items_lookup(LocalEngine(small_config("unused", fitted[2])), wide, data,
                                   bucket_rows=len(t) // 3)) == want
    # buckets of two parts' rows: each split task reads a group of parts
    calls = []

    class Recording(LocalEngine):
        def map(self, fn, items):
            items = list(items)
            calls.append((fn.__name__, [len(item[1]) for item in items]))
            return super().map(fn, items)

    rows = max(e.rows for e in data)
    grouped = sid_items_lookup(Recording(small_config("unused", fitted[2])), ctx, data,
                               bucket_rows=2 * rows)
    assert len(grouped) == -(-len(t) // (2 * rows)) > 1
    name, group_sizes = calls[0]
    assert name == "sid_items_split" and sum(group_sizes) == len(data)
    assert len(group_sizes) < len(data) and max(group_sizes) > 1
    assert sum(len(pq.read_table(store.entry_path(vid, e))) for e in grouped) == len(want)
    assert lookup(grouped) == want
    assert not store.fs.exists(f"{store.version_dir(vid)}/_staging/sid_items")


def test_prune_sweep_job_builds_under_its_own_root(small_catalog, tmp_path):
    """jobs/prune_sweep.py prints a row per strategy and leaves the config's table alone:
    its versions go to --root (a temporary directory by default, removed after), so the
    sweep's last version does not become the table's `_latest`; an output.root override, and
    a cluster engine with no --root, are refused."""
    catalog, _ = small_catalog
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(json.dumps({
        "engine": "local", "seed": 3, "input": {"path": catalog},
        "output": {"root": str(tmp_path / "table-root"), "table": "sids"},
        "quantizer": {"layers": LAYERS, "niter": 3}, "fit": {"sample_size": 1000}}))
    sweep = tmp_path / "sweep-root"
    run = subprocess.run([sys.executable, "jobs/prune_sweep.py", "--config", str(cfg),
                          "--root", str(sweep)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split(" | ")[0].lstrip("| ") for line in run.stdout.splitlines()[2:]]
    assert LAYERS[1] == 8  # K=16 and K=64 would prune every token of it: not swept
    assert rows == ["none", "drop_layer", "top_k K=4",
                    "mass p=0.1", "mass p=0.3", "sarq tau=0.001", "sarq tau=0.0002"]
    drop = run.stdout.splitlines()[3].split(" | ")
    assert drop[1:3] == ["-", "0"]  # drop_layer: no item keeps layer 1, so it has no Gini
    assert run.stderr.startswith("sweep: building the base version (fit once) under ")
    assert not (tmp_path / "table-root").exists()
    assert len(TableStore(str(sweep), "sids").versions()) == 1 + len(rows)
    tmp = tmp_path / "tmp"  # the default root: a temporary directory, removed afterwards
    tmp.mkdir()
    default = subprocess.run([sys.executable, "jobs/prune_sweep.py", "--config", str(cfg),
                              "quantizer.niter=1"], cwd=REPO, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "TMPDIR": str(tmp)})
    assert default.returncode == 0, default.stderr[-3000:]
    assert len(default.stdout.splitlines()) == 2 + len(rows)
    assert not (tmp_path / "table-root").exists() and list(tmp.iterdir()) == []
    for engine, over, message in (
            ("ray", "output.root=/elsewhere", "output.root: output.root is set by the sweep "
                                              "itself: give its output root as --root DIR"),
            ("spark", "output={root: /x}", "output: output.root is set by the sweep itself"),
            ("ray", "ray.address=auto", "engine ray runs on a cluster here: give --root on "
                                        "storage every worker can reach"),
            ("spark", "spark.master=spark://127.0.0.1:7077", "engine spark runs on a cluster "
                                                             "here: give --root")):
        refused = subprocess.run([sys.executable, "jobs/prune_sweep.py", "--config", str(cfg),
                                  f"engine={engine}", over], cwd=REPO, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.startswith(f"prune_sweep.py: error: {message}"), refused.stderr
