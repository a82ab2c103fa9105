"""codes/: mergeable partials, metrics and collision suffixes against brute-force references.

Every expected value here is recomputed from the raw (codes, x, sq_residual) with plain
Python loops, collections.Counter and itertools.combinations, never taken from the
implementation's own output.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import random
import re
import warnings
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest

from semid_dist import packing
from semid_dist.codes.collisions import (
    add_keys,
    assign_suffixes,
    free_suffixes,
    key_range_bounds,
    needs_suffixes,
)
from semid_dist.codes.metrics import (
    QUANTILES,
    collision_stats,
    finalize_metrics,
    gini,
    preference_discrimination,
)
from semid_dist.codes.partials import (
    COUNT_SPAN,
    Partial,
    StreamMerge,
    _rows_tensor,
    _unique,
    head_tail_partials,
    merge,
    merge_all,
    partial_from_batch,
    radix,
    sid_keys,
    subtract_rows,
)
from semid_dist.codes.pruning import PruneDecision

SIZES = [8, 5, 7]
D = 6


# ----------------------------------------------------------------------------- data


def random_batch(n: int = 500, sizes=SIZES, d: int = D, seed: int = 0):
    """Skewed random codes (the last layer never uses its last token), x, sq_residual."""
    rng = np.random.default_rng(seed)
    cols = []
    for i, k in enumerate(sizes):
        hi = k - 1 if i == len(sizes) - 1 else k  # leave one token of the last layer unused
        w = rng.pareto(1.2, hi) + 0.05
        cols.append(rng.choice(hi, n, p=w / w.sum()))
    codes = np.stack(cols, axis=1).astype(np.int32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    # decreasing residuals per layer, as in residual quantization
    sq = (rng.random((n, len(sizes))) * np.array([3.0, 2.0, 1.0][: len(sizes)])).astype(
        np.float32)
    return codes, x, sq


# ------------------------------------------------------------------ brute-force reference


def _dot(a, b) -> float:
    return sum(float(u) * float(v) for u, v in zip(a, b))


def _norm(a) -> float:
    return math.sqrt(_dot(a, a))


def _cos(a, b) -> float:
    return _dot(a, b) / (_norm(a) * _norm(b))


def brute_gini(counts) -> float:
    c = [float(v) for v in counts]
    k = len(c)
    mean = sum(c) / k
    if mean == 0:
        return 0.0
    return sum(abs(a - b) for a in c for b in c) / (2 * k * k * mean)


def brute_layer(column, size: int) -> dict:
    counter = Counter(int(v) for v in column)
    c = [counter.get(t, 0) for t in range(size)]
    n = sum(c)
    used = sum(1 for v in c if v > 0)
    entropy = -sum(v / n * math.log(v / n) for v in c if v > 0)
    mean = n / size
    return {
        "size": size, "used": used, "utilization": used / size, "entropy": entropy,
        "entropy_norm": entropy / math.log(size) if size > 1 else 0.0,
        "perplexity": math.exp(entropy), "gini": brute_gini(c),
        "std": math.sqrt(sum((v - mean) ** 2 for v in c) / size), "top_share": max(c) / n,
    }


def brute_quantile(sizes_per_sid, q: str) -> int:
    """Smallest c such that at least a share q of SIDs hold <= c items (exact arithmetic)."""
    values = sorted(sizes_per_sid)
    share = Fraction(q)
    for c in values:
        if Fraction(sum(1 for v in values if v <= c), len(values)) >= share:
            return c
    raise AssertionError("unreachable")


def brute_metrics(codes, x, sq, sizes, *, depth: int, t: float = 2.0) -> dict:
    rows = [tuple(int(v) for v in r) for r in codes]
    n = len(rows)
    layers = [brute_layer([r[i] for r in rows], k) for i, k in enumerate(sizes)]
    prefixes = []
    for dep in range(1, len(sizes) + 1):
        distinct = len({r[:dep] for r in rows})
        prefixes.append({"depth": dep, "distinct": distinct,
                         "sparsity": distinct / min(n, math.prod(sizes[:dep]))})
    per_sid = Counter(rows)
    collisions = {
        "distinct_sids": len(per_sid),
        "unique_sid_rate": sum(1 for r in rows if per_sid[r] == 1) / n,
        "mean_items_per_sid": n / len(per_sid),
        "max_items_per_sid": max(per_sid.values()),
        "items_per_sid_quantiles": {q: brute_quantile(per_sid.values(), q) for q in QUANTILES},
    }
    last = [float(v) for v in sq[:, -1]]
    x_sq = sum(_dot(v, v) for v in x)
    recon = {
        "mse": sum(last) / n,
        "relative_error": sum(last) / x_sq,
        "residual_norm_by_layer": [sum(math.sqrt(float(v)) for v in sq[:, i]) / n
                                   for i in range(len(sizes))],
        "residual_sq_norm_by_layer": [sum(float(v) for v in sq[:, i]) / n
                                      for i in range(len(sizes))],
    }
    clusters = defaultdict(list)
    for r, v in zip(rows, x):
        clusters[r[:depth]].append(v)
    # semantic cohesion: mean over clusters (>= 2 items) of mean pairwise cosine, i != j
    per_cluster = []
    for members in clusters.values():
        m = len(members)
        if m < 2:
            continue
        # cos is symmetric: the ordered pairs i != j are each unordered pair twice
        total = 2 * sum(_cos(members[i], members[j])
                        for i, j in itertools.combinations(range(m), 2))
        per_cluster.append(total / (m * (m - 1)))
    sc = sum(per_cluster) / len(per_cluster) if per_cluster else None
    # preference discrimination: centroids = mean of unit vectors, all cluster pairs
    centroids = []
    for members in clusters.values():
        units = [[float(a) / _norm(v) for a in v] for v in members]
        centroids.append([sum(col) / len(units) for col in zip(*units)])
    pairs = [math.exp(-t * (1 - _cos(a, b))) for a, b in itertools.combinations(centroids, 2)]
    pd = math.log(sum(pairs) / len(pairs)) if pairs else None
    return {"layers": layers, "prefixes": prefixes, "collisions": collisions,
            "reconstruction": recon,
            "quality": {"depth": depth, "clusters": len(clusters), "semantic_cohesion": sc,
                        "preference_discrimination": pd}}


def assert_metrics_match(got: dict, want: dict) -> None:
    assert len(got["layers"]) == len(want["layers"])
    for i, (g, w) in enumerate(zip(got["layers"], want["layers"])):
        assert g["layer"] == i
        for key in ("size", "used"):
            assert g[key] == w[key], (i, key)
        for key in ("utilization", "entropy", "entropy_norm", "perplexity", "gini", "std",
                    "top_share"):
            assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-12), (i, key)
    assert [p["depth"] for p in got["prefixes"]] == [p["depth"] for p in want["prefixes"]]
    for g, w in zip(got["prefixes"], want["prefixes"]):
        assert g["distinct"] == w["distinct"]
        assert g["sparsity"] == pytest.approx(w["sparsity"], rel=1e-12)
    gc, wc = got["collisions"], want["collisions"]
    assert gc["distinct_sids"] == wc["distinct_sids"]
    assert gc["max_items_per_sid"] == wc["max_items_per_sid"]
    assert gc["items_per_sid_quantiles"] == wc["items_per_sid_quantiles"]
    assert gc["unique_sid_rate"] == pytest.approx(wc["unique_sid_rate"], rel=1e-12)
    assert gc["mean_items_per_sid"] == pytest.approx(wc["mean_items_per_sid"], rel=1e-12)
    gr, wr = got["reconstruction"], want["reconstruction"]
    assert gr["mse"] == pytest.approx(wr["mse"], rel=1e-9)
    assert gr["relative_error"] == pytest.approx(wr["relative_error"], rel=1e-6)
    assert gr["residual_norm_by_layer"] == pytest.approx(wr["residual_norm_by_layer"], rel=1e-9)
    assert gr["residual_sq_norm_by_layer"] == pytest.approx(wr["residual_sq_norm_by_layer"],
                                                            rel=1e-9)
    gq, wq = got["quality"], want["quality"]
    assert gq["depth"] == wq["depth"]
    assert gq["clusters"] == wq["clusters"]
    for key in ("semantic_cohesion", "preference_discrimination"):
        if wq[key] is None:
            assert gq[key] is None, key
        else:
            assert gq[key] == pytest.approx(wq[key], rel=1e-6, abs=1e-9), key


def metrics_of(codes, x, sq, sizes, depth):
    p = partial_from_batch(codes, sq, x, sizes, quality_depth=depth)
    return finalize_metrics(p, list(sizes), quality_depth=depth, pd_t=2.0)


# ------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(seed, depth):
    codes, x, sq = random_batch(seed=seed)
    got = metrics_of(codes, x, sq, SIZES, depth)
    want = brute_metrics(codes, x, sq, SIZES, depth=depth)
    assert_metrics_match(got, want)
    # the data really exercises the interesting cases
    assert got["layers"][2]["used"] < SIZES[2]
    assert 0 < got["collisions"]["unique_sid_rate"] < 1


def test_sid_keys_are_mixed_radix_and_injective():
    codes, _, _ = random_batch(n=300, seed=5)
    keys = sid_keys(codes, SIZES)
    for row, key in zip(codes.tolist(), keys.tolist()):
        assert key == (row[0] * SIZES[1] + row[1]) * SIZES[2] + row[2]
    for depth in (1, 2, 3):
        pk = sid_keys(codes, SIZES, depth)
        by_key = defaultdict(set)
        for row, key in zip(codes.tolist(), pk.tolist()):
            by_key[key].add(tuple(row[:depth]))
        assert all(len(v) == 1 for v in by_key.values())
        assert len(by_key) == len({tuple(r[:depth]) for r in codes.tolist()})
    assert radix([8, 5, 7]).tolist() == [35, 7, 1]


def test_one_item():
    codes = np.array([[3, 1, 4]], dtype=np.int32)
    x = np.array([[1, 2, 3, 4, 5, 6]], dtype=np.float32)
    sq = np.array([[2.0, 1.0, 0.5]], dtype=np.float32)
    got = metrics_of(codes, x, sq, SIZES, 2)
    assert_metrics_match(got, brute_metrics(codes, x, sq, SIZES, depth=2))
    for layer, k in zip(got["layers"], SIZES):
        assert layer["used"] == 1
        assert layer["utilization"] == pytest.approx(1 / k)
        assert layer["entropy"] == 0.0
        assert layer["perplexity"] == 1.0
        assert layer["top_share"] == 1.0
        assert layer["gini"] == pytest.approx((k - 1) / k)
    assert [p["distinct"] for p in got["prefixes"]] == [1, 1, 1]
    assert [p["sparsity"] for p in got["prefixes"]] == [1.0, 1.0, 1.0]
    col = got["collisions"]
    assert col["unique_sid_rate"] == 1.0
    assert col["max_items_per_sid"] == 1
    assert set(col["items_per_sid_quantiles"].values()) == {1}
    assert got["reconstruction"]["mse"] == pytest.approx(0.5)
    assert got["quality"]["semantic_cohesion"] is None
    assert got["quality"]["preference_discrimination"] is None


def test_all_items_in_one_token():
    n = 40
    codes = np.zeros((n, 3), dtype=np.int32)
    codes[:, 1] = 2
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, D)).astype(np.float32)
    sq = rng.random((n, 3)).astype(np.float32)
    got = metrics_of(codes, x, sq, SIZES, 2)
    assert_metrics_match(got, brute_metrics(codes, x, sq, SIZES, depth=2))
    for layer, k in zip(got["layers"], SIZES):
        assert layer["used"] == 1
        assert layer["utilization"] == pytest.approx(1 / k)
        assert layer["entropy"] == 0.0
        assert layer["entropy_norm"] == 0.0
        assert layer["gini"] == pytest.approx((k - 1) / k)
        assert layer["top_share"] == 1.0
    assert got["collisions"]["unique_sid_rate"] == 0.0
    assert got["collisions"]["max_items_per_sid"] == n
    assert got["quality"]["clusters"] == 1
    assert got["quality"]["preference_discrimination"] is None  # a single cluster has no pair


def test_unused_tokens_count_as_zero_in_gini_and_std():
    # 2 of 4 tokens used, evenly: gini over the used tokens alone would be 0
    codes = np.array([[0, 0, 0]] * 3 + [[1, 0, 0]] * 3, dtype=np.int32)
    sizes = [4, 2, 3]
    x = np.ones((6, 2), dtype=np.float32)
    sq = np.ones((6, 3), dtype=np.float32)
    got = metrics_of(codes, x, sq, sizes, 2)
    assert_metrics_match(got, brute_metrics(codes, x, sq, sizes, depth=2))
    layer0 = got["layers"][0]
    assert layer0["used"] == 2 and layer0["utilization"] == 0.5
    assert layer0["gini"] == pytest.approx(brute_gini([3, 3, 0, 0]))
    assert layer0["gini"] > 0.4
    assert layer0["std"] == pytest.approx(1.5)  # counts [3,3,0,0], mean 1.5
    assert layer0["entropy_norm"] == pytest.approx(math.log(2) / math.log(4))


def test_hourglass_middle_layer_is_most_concentrated():
    rng = np.random.default_rng(11)
    n, sizes = 2000, [16, 16, 16]
    c0 = rng.integers(0, 16, n)
    c1 = np.where(rng.random(n) < 0.85, 0, rng.integers(0, 16, n))
    c2 = rng.integers(0, 16, n)
    codes = np.stack([c0, c1, c2], axis=1).astype(np.int32)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    sq = rng.random((n, 3)).astype(np.float32)
    layers = metrics_of(codes, x, sq, sizes, 2)["layers"]
    for key in ("gini", "top_share"):
        assert layers[1][key] > layers[0][key], key
        assert layers[1][key] > layers[2][key], key
    assert layers[1]["entropy"] < min(layers[0]["entropy"], layers[2]["entropy"])
    for i in range(3):
        want = brute_layer(codes[:, i], 16)
        assert layers[i]["gini"] == pytest.approx(want["gini"])
        assert layers[i]["top_share"] == pytest.approx(want["top_share"])


def test_quantile_definition_over_many_sid_counts():
    rng = np.random.default_rng(4)
    for m in list(range(1, 60)) + [99, 100, 101, 999, 1000, 1001]:
        counts = rng.integers(1, 9, m)
        n = int(counts.sum())
        got = collision_stats(counts.astype(np.int64), n)["items_per_sid_quantiles"]
        assert got == {q: brute_quantile(counts.tolist(), q) for q in QUANTILES}, m


def test_preference_discrimination_cluster_cap_is_deterministic_and_bounded():
    codes, x, sq = random_batch(seed=9)
    p = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    a = finalize_metrics(p, SIZES, quality_depth=2, pd_max_clusters=5, seed=3)
    b = finalize_metrics(p, SIZES, quality_depth=2, pd_max_clusters=5, seed=3)
    pd = a["quality"]["preference_discrimination"]
    assert pd == b["quality"]["preference_discrimination"]
    assert -2 * 2.0 <= pd <= 0.0  # exp(-t (1 - cos)) lies in [e^{-2t}, 1]
    full = finalize_metrics(p, SIZES, quality_depth=2, pd_max_clusters=len(p.q_keys))
    want = brute_metrics(codes, x, sq, SIZES, depth=2)["quality"]["preference_discrimination"]
    assert full["quality"]["preference_discrimination"] == pytest.approx(want, rel=1e-6)


def test_preference_discrimination_of_a_large_t_is_its_value_not_an_error():
    """A t at which every pair's exp(-t (1 - cos)) is under float64's range (1e6, the
    largest allowed): the mean's logarithm all the same, from the terms shifted by the
    largest (it was log(0): a math domain error after the whole encode); a t whose terms
    are in range gives the same value as before, the formula written out."""
    rng = np.random.default_rng(5)
    sums = rng.normal(size=(40, 6))
    u = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    i, j = np.triu_indices(len(u), k=1)
    for t in (2.0, 1e6):
        x = -t * (1.0 - (u[i] * u[j]).sum(axis=1))
        top = x.max()
        want = top + math.log(np.exp(x - top).mean())
        got = preference_discrimination(sums, t=t, max_clusters=100, seed=0)
        assert got == pytest.approx(want, rel=1e-9)


def test_zero_embeddings_do_not_distort_semantic_cohesion():
    # cluster 0: two zero vectors (no direction, left out as preference_discrimination does);
    # cluster 1: two identical vectors (cosine 1). Cohesion over items with a direction: 1.
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.int32)
    x = np.array([[0, 0, 0], [0, 0, 0], [1, 2, 3], [1, 2, 3]], dtype=np.float32)
    sq = np.zeros((4, 2), dtype=np.float32)
    got = metrics_of(codes, x, sq, [2, 2], 1)["quality"]
    assert got["semantic_cohesion"] == pytest.approx(1.0)


# ------------------------------------------------------------------------ partials


def _assert_array_equal(name, x, y, exact_floats):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape, name
    if x.dtype.kind == "f" and not exact_floats:
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10, err_msg=name)
    else:
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), name


def assert_partials_equal(a: Partial, b: Partial, *, exact_floats: bool = False) -> None:
    """Every field: integer arrays exactly, float sums allclose (or exactly)."""
    for f in dataclasses.fields(Partial):
        ga, gb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(ga, list):
            assert isinstance(gb, list) and len(ga) == len(gb), f.name
            for i, (x, y) in enumerate(zip(ga, gb)):
                _assert_array_equal(f"{f.name}[{i}]", x, y, exact_floats)
        elif isinstance(ga, float) and not exact_floats:
            assert ga == pytest.approx(gb, rel=1e-10), f.name
        else:
            _assert_array_equal(f.name, ga, gb, exact_floats)
    assert a.n == b.n
    assert a.layer_counts[0].dtype.kind == "i"


def split_partials(codes, x, sq, bounds, depth=2):
    return [partial_from_batch(codes[lo:hi], sq[lo:hi], x[lo:hi], SIZES, quality_depth=depth)
            for lo, hi in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("seed", range(8))
def test_merge_of_any_split_equals_single_pass(seed):
    codes, x, sq = random_batch(seed=100 + seed)
    n = len(codes)
    whole = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    rng = random.Random(seed)
    pieces = rng.randint(1, 5)
    cuts = sorted(rng.sample(range(1, n), pieces - 1))
    parts = split_partials(codes, x, sq, [0, *cuts, n])
    assert sum(p.n for p in parts) == n
    orders = [list(range(pieces)), list(range(pieces))[::-1]]
    shuffled = list(range(pieces))
    rng.shuffle(shuffled)
    orders.append(shuffled)
    for order in orders:
        merged = merge_all([parts[i] for i in order])
        assert_partials_equal(merged, whole)
    # a tree of merges gives the statistics of merge_all's left fold
    tree = parts
    while len(tree) > 1:
        tree = [merge(*tree[i:i + 2]) if i + 1 < len(tree) else tree[i]
                for i in range(0, len(tree), 2)]
    assert_partials_equal(tree[0], whole)
    got = finalize_metrics(merge_all(parts), SIZES, quality_depth=2)
    assert_metrics_match(got, brute_metrics(codes, x, sq, SIZES, depth=2))


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_partial_of_a_row_mask_equals_the_partial_of_those_rows(share):
    """rows=mask (a shard's head or tail, summed without copying x) gives the statistics of
    the selected rows alone, bit for bit, zero vectors (no direction) included."""
    codes, x, sq = random_batch(n=3000, seed=31)
    x[::7] = 0.0
    mask = np.random.default_rng(32).random(len(codes)) < share
    got = partial_from_batch(codes, sq, x, SIZES, quality_depth=2, rows=mask)
    want = partial_from_batch(codes[mask], sq[mask], x[mask].copy(), SIZES, quality_depth=2)
    assert got.n == int(mask.sum())
    assert_partials_equal(got, want, exact_floats=True)
    assert_partials_equal(merge(got, partial_from_batch(codes, sq, x, SIZES, quality_depth=2,
                                                        rows=~mask)),
                          partial_from_batch(codes, sq, x, SIZES, quality_depth=2))


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("depth", [1, 2, len(SIZES)])
@pytest.mark.parametrize("n", [0, 3000])
def test_head_tail_partials_are_the_row_mask_partials_bit_for_bit(share, zeros, depth, n):
    """One pass over x for a shard's head and tail gives exactly the two row-mask partials
    (and their serialized bytes), with and without zero vectors, at every quality depth
    (the head's prefix groups are keyed first, the tail's after them), and for an empty
    shard."""
    codes, x, sq = random_batch(n=3000, seed=33)
    codes, x, sq = codes[:n], x[:n], sq[:n]
    if zeros:
        x[::5] = 0.0
    mask = np.random.default_rng(34).random(len(codes)) < share
    head, tail = head_tail_partials(codes, sq, x, SIZES, quality_depth=depth, mask=mask)
    for got, rows in ((head, mask), (tail, ~mask)):
        want = partial_from_batch(codes, sq, x, SIZES, quality_depth=depth, rows=rows)
        assert got.n == int(rows.sum())
        assert_partials_equal(got, want, exact_floats=True)
        assert got.to_bytes() == want.to_bytes()
        assert got.pack() == want.pack()


def test_prefix_groups_of_zero_vectors_alone_are_left_out():
    """The quality table counts and sums the rows with a direction only: a prefix whose rows
    are all zero vectors has no entry, and a prefix with some keeps the count of the others
    (the brute-force table of the non-zero rows, bit for bit: zero rows add nothing)."""
    codes, x, sq = random_batch(n=2000, seed=41)
    prefix = sid_keys(codes, SIZES, 2)
    alone = np.unique(prefix)[::3]  # these prefixes: zero vectors only
    x[np.isin(prefix, alone)] = 0.0
    x[::7] = 0.0  # and a few zero rows among the others
    got = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    live = np.einsum("ij,ij->i", x, x, dtype=np.float64) > 0
    keys, inverse, counts = np.unique(prefix[live], return_inverse=True, return_counts=True)
    np.testing.assert_array_equal(got.q_keys, keys)
    np.testing.assert_array_equal(got.q_counts, counts)
    assert not np.isin(got.q_keys, alone).any()
    x64 = x[live].astype(np.float64)
    want = np.zeros((len(keys), x.shape[1]))
    np.add.at(want, inverse, x64 * (1.0 / np.sqrt(np.einsum("ij,ij->i", x64, x64)))[:, None])
    np.testing.assert_array_equal(got.q_sums, want)
    assert got.n == len(codes)


@pytest.mark.parametrize("span", [50, COUNT_SPAN, 4 * 3000, 4 * 3000 + 1, 2**20, 2**31, 2**40])
@pytest.mark.parametrize("n", [0, 1, 3000])
def test_unique_by_counting_or_sorting_is_numpys_unique(span, n):
    """Keys in a small span are counted and others sorted (as int32 up to a span of 2^31):
    either way the very arrays of np.unique (distinct keys, counts, inverse), so a shard's
    statistics do not depend on the path."""
    keys = np.random.default_rng(span % 1000 + n).integers(0, min(span, 2**40), n)
    keys[:n // 3] = keys[n // 3:2 * (n // 3)]  # repeats
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    for want_inverse in (False, True):
        got_uniq, got_counts, got_inverse = _unique(keys, span, inverse=want_inverse)
        np.testing.assert_array_equal(got_uniq, uniq)
        assert got_uniq.dtype == np.int64 and got_counts.dtype == np.int64
        np.testing.assert_array_equal(got_counts, counts)
        if want_inverse:
            np.testing.assert_array_equal(got_inverse, inverse)
        else:
            assert got_inverse is None


def test_merge_with_an_empty_partial_is_identity():
    codes, x, sq = random_batch(n=120, seed=21)
    whole = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    empty = partial_from_batch(codes[:0], sq[:0], x[:0], SIZES, quality_depth=2)
    assert empty.n == 0 and all(int(c.sum()) == 0 for c in empty.layer_counts)
    assert_partials_equal(merge(empty, whole), whole)
    assert_partials_equal(merge_all([whole, empty]), whole)


def test_merge_places_a_then_adds_b_as_numpy_fancy_indexing_does():
    """The merged unit-vector sums are numpy's `out[ia] = sa; out[ib] += sb` bit for bit
    (keys in one side only included; a -0.0 of a alone stays, one of b alone becomes 0 +
    -0.0 = +0.0), whatever form the inputs come in: read-only arrays (a staged result's
    views) and float32 (as staged) give the same bytes, and a read-only input is copied, not
    wrapped (torch warns on those, once per process)."""
    rng = np.random.default_rng(7)
    ka, kb = np.array([1, 4, 5, 9, 12]), np.array([0, 4, 9, 10, 12, 30])
    sa, sb = rng.standard_normal((len(ka), 6)), rng.standard_normal((len(kb), 6))
    sa[2, 3] = sb[0, 1] = -0.0
    uniq = np.union1d(ka, kb)
    expect = np.zeros((len(uniq), 6))
    expect[np.searchsorted(uniq, ka)] = sa
    expect[np.searchsorted(uniq, kb)] += sb

    def partial(keys, sums):
        return Partial(n=len(keys), layer_counts=[np.zeros(2, np.int64)],
                       sid_keys=np.zeros(0, np.int64), sid_counts=np.zeros(0, np.int64),
                       sq_res_sum=np.zeros(1), res_norm_sum=np.zeros(1), x_sq_sum=0.0,
                       q_keys=keys, q_counts=np.ones(len(keys), np.int64), q_sums=sums,
                       trans_keys=[], trans_counts=[])

    for form in (lambda a: a, lambda a: np.frombuffer(a.tobytes()).reshape(a.shape)):
        got = merge(partial(ka, form(sa)), partial(kb, form(sb)))
        np.testing.assert_array_equal(got.q_keys, uniq)
        assert got.q_sums.dtype == np.float64
        assert got.q_sums.tobytes() == expect.tobytes()
        np.testing.assert_array_equal(got.q_counts, np.isin(uniq, ka).astype(int)
                                      + np.isin(uniq, kb))
    read_only = np.frombuffer(sa.tobytes()).reshape(sa.shape)
    wrapped = _rows_tensor(read_only).numpy()
    assert wrapped.flags.writeable and not np.shares_memory(wrapped, read_only)
    assert np.shares_memory(_rows_tensor(sa).numpy(), sa)  # a writable float64 one is not copied
    low = merge(partial(ka, sa.astype(np.float32)), partial(kb, sb.astype(np.float32)))
    ref = np.zeros((len(uniq), 6))
    ref[np.searchsorted(uniq, ka)] = sa.astype(np.float32)
    ref[np.searchsorted(uniq, kb)] += sb.astype(np.float32)
    assert low.q_sums.tobytes() == ref.tobytes()


def test_merge_all_needs_at_least_one_partial():
    with pytest.raises(ValueError, match="merge_all needs at least one partial"):
        merge_all([])
    with pytest.raises(ValueError, match="no partials were merged"):
        StreamMerge().result()


@pytest.mark.parametrize("pieces", [1, 2, 3, 5, 7, 8, 13])
def test_stream_merge_is_bit_identical_to_merge_all(pieces):
    """Shard statistics merged as they arrive give the very bytes of merge_all's."""
    codes, x, sq = random_batch(n=40 * pieces, seed=300 + pieces)
    parts = split_partials(codes, x, sq, np.linspace(0, len(codes), pieces + 1).astype(int))
    stream = StreamMerge()
    for i, p in enumerate(parts, 1):
        stream.push(p)
        assert len(stream) == i
    assert stream.result().to_bytes() == merge_all(parts).to_bytes()


def test_stream_merge_holds_its_running_total_alone():
    """Whatever the number of shards, a merge in progress holds one Partial (a tree of
    merges held a total per run: 3 after 7 shards, 4 after 15; the encode stage's peak RSS
    grew with the catalog's shards)."""
    codes, x, sq = random_batch(n=15 * 40, seed=77)

    def live() -> int:
        gc.collect()
        with warnings.catch_warnings():  # (torch's deprecated attributes warn when touched)
            warnings.simplefilter("ignore", FutureWarning)
            return sum(isinstance(o, Partial) for o in gc.get_objects())

    before = live()
    stream = StreamMerge()
    for lo in range(0, len(codes), 40):  # each shard's partial made as it arrives
        stream.push(partial_from_batch(codes[lo:lo + 40], sq[lo:lo + 40], x[lo:lo + 40],
                                       SIZES, quality_depth=2))
        assert live() - before == 1
    assert_partials_equal(stream.result(), partial_from_batch(codes, sq, x, SIZES,
                                                              quality_depth=2))


def test_the_merge_benchmark_job_runs_and_its_two_merges_agree():
    """jobs/merge_bench.py (README's figure of the SID tables' merge time) runs, and
    StreamMerge's result is the one total's, byte for byte."""
    import subprocess
    import sys

    from tests.conftest import REPO

    run = subprocess.run([sys.executable, "jobs/merge_bench.py", "--shards", "5", "--dim", "4"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^5 shards of 65536 items, d = 4: \d+ SIDs; merge time: StreamMerge "
                     r"[\d.]+ s, one total [\d.]+ s \([\d.]+x\); results identical: True$",
                     run.stdout.strip().splitlines()[-1]), run.stdout


def test_partial_counts_match_counter():
    codes, x, sq = random_batch(seed=31)
    p = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    for i, k in enumerate(SIZES):
        counter = Counter(codes[:, i].tolist())
        assert p.layer_counts[i].tolist() == [counter.get(t, 0) for t in range(k)]
    per_sid = Counter(tuple(r) for r in codes.tolist())
    got = dict(zip(p.sid_keys.tolist(), p.sid_counts.tolist()))
    want = {(a * SIZES[1] + b) * SIZES[2] + c: v for (a, b, c), v in per_sid.items()}
    assert got == want
    assert p.sid_keys.tolist() == sorted(want)


@pytest.mark.parametrize("form", ["npz", "bundle"])
@pytest.mark.parametrize("n", [0, 1, 500])
def test_partial_bytes_round_trip(n, form):
    codes, x, sq = random_batch(n=max(n, 1), seed=41)
    codes, x, sq = codes[:n], x[:n], sq[:n]
    p = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    data = p.to_bytes() if form == "npz" else p.pack()
    assert isinstance(data, bytes)
    assert data.startswith(b"PK") == (form == "npz")  # npz is a zip archive
    q = Partial.from_bytes(data)
    # the staged bundle holds the unit-vector sums in float32; read back as float64
    want = p if form == "npz" else staged(p)
    assert_partials_equal(q, want, exact_floats=True)
    for name in ("sid_keys", "sid_counts", "q_keys", "q_counts", "q_sums", "sq_res_sum"):
        assert getattr(q, name).dtype == getattr(p, name).dtype, name
    assert q.q_sums.shape == (len(p.q_keys), D)
    if n:  # the driver merges into what it unpacked: the arrays must be writable
        assert q.q_sums.flags.writeable and q.sid_counts.flags.writeable
        assert_partials_equal(merge(q, q), merge(want, want), exact_floats=True)
    if n and form == "bundle":  # rounded, each sum to float32's precision
        assert not np.array_equal(q.q_sums, p.q_sums)
        np.testing.assert_allclose(q.q_sums, p.q_sums, rtol=2**-24, atol=0)
    assert Partial.from_bytes(q.to_bytes()).q_sums.dtype == np.float64
    # a bundle staged with float64 sums (by an interrupted run of an older build) reads as is
    assert_partials_equal(Partial.from_bytes(packing.pack(p._arrays())), p, exact_floats=True)


def staged(p: Partial) -> Partial:
    """`p` as its staged bundle carries it: the unit-vector sums rounded to float32."""
    return dataclasses.replace(p, q_sums=p.q_sums.astype(np.float32).astype(np.float64))


def test_partial_bytes_round_trip_many_layers():
    sizes = [3] * 12  # > 10 layers: layer_counts_10 must not sort before layer_counts_2
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 3, 50) for _ in sizes], axis=1).astype(np.int32)
    codes[:, 11] = 0  # a distinct distribution for one late layer
    x = rng.normal(size=(50, 3)).astype(np.float32)
    sq = rng.random((50, 12)).astype(np.float32)
    p = partial_from_batch(codes, sq, x, sizes, quality_depth=2)
    assert_partials_equal(Partial.from_bytes(p.to_bytes()), p, exact_floats=True)
    assert_partials_equal(Partial.from_bytes(p.pack()), staged(p), exact_floats=True)


# ------------------------------------------------------------------------ gini


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_gini_even_counts_is_zero(k):
    assert gini(np.full(k, 5)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_gini_one_hot_is_k_minus_one_over_k(k):
    counts = np.zeros(k)
    counts[k // 2] = 9
    assert gini(counts) == pytest.approx((k - 1) / k)


def test_gini_matches_mean_absolute_difference():
    rng = np.random.default_rng(8)
    for _ in range(20):
        counts = rng.integers(0, 50, rng.integers(1, 30))
        assert gini(counts) == pytest.approx(brute_gini(counts.tolist()), abs=1e-12)
    assert gini(np.zeros(5)) == 0.0


# ------------------------------------------------------------------------ suffixes


def brute_suffixes(keys, qerr, ids):
    groups = defaultdict(list)
    for i, (k, e, item) in enumerate(zip(keys, qerr, ids)):
        groups[int(k)].append((float(e), item, i))
    out = [None] * len(keys)
    for members in groups.values():
        for rank, (_, _, i) in enumerate(sorted(members)):
            out[i] = rank
    return out


def suffix_case(n=400, seed=0, string_ids=False):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 40, n).astype(np.int64)
    qerr = rng.choice(np.array([0.25, 0.5, 0.75, 1.0], dtype=np.float32), n)  # many ties
    if string_ids:
        ids = [f"item-{v}" for v in rng.permutation(10 * n)[:n]]  # "item-10" < "item-9"
        arr = pa.array(ids, pa.string())
    else:
        ids = rng.permutation(10 * n)[:n].tolist()
        arr = pa.array(ids, pa.int64())
    return keys, qerr, ids, arr


@pytest.mark.parametrize("string_ids", [False, True])
def test_assign_suffixes_matches_brute_force(string_ids):
    keys, qerr, ids, arr = suffix_case(seed=1, string_ids=string_ids)
    got = assign_suffixes(keys, qerr, arr)
    assert got.dtype == np.int32
    assert got.tolist() == brute_suffixes(keys, qerr, ids)
    pairs = list(zip(keys.tolist(), got.tolist()))
    assert len(set(pairs)) == len(pairs)
    per_key = defaultdict(list)
    for k, s in pairs:
        per_key[k].append(s)
    for k, suffixes in per_key.items():
        assert sorted(suffixes) == list(range(len(suffixes))), k


def test_assign_suffixes_ties_broken_by_item_id():
    keys = np.array([7, 7, 7, 7, 3], dtype=np.int64)
    qerr = np.array([0.5, 0.5, 0.1, 0.5, 0.9], dtype=np.float32)
    ids = pa.array(["b", "c", "z", "a", "q"])
    got = assign_suffixes(keys, qerr, ids).tolist()
    # key 7: z (lowest qerr) first, then a < b < c among the tied 0.5 errors
    assert got == [2, 3, 0, 1, 0]


@pytest.mark.parametrize("string_ids", [False, True])
def test_assign_suffixes_independent_of_row_order(string_ids):
    keys, qerr, ids, arr = suffix_case(seed=2, string_ids=string_ids)
    base = dict(zip(ids, assign_suffixes(keys, qerr, arr).tolist()))
    rng = np.random.default_rng(5)
    for _ in range(3):
        perm = rng.permutation(len(keys))
        shuffled_ids = [ids[i] for i in perm]
        got = assign_suffixes(keys[perm], qerr[perm], arr.take(pa.array(perm)))
        assert dict(zip(shuffled_ids, got.tolist())) == base


def test_assign_suffixes_empty_and_colliding_keys():
    out = assign_suffixes(np.zeros(0, np.int64), np.zeros(0, np.float32), pa.array([], pa.int64()))
    assert out.shape == (0,)
    codes, x, sq = random_batch(seed=6)
    p = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    per_key = Counter(sid_keys(codes, SIZES).tolist())
    colliding = p.sid_keys[needs_suffixes(p.sid_keys, p.sid_counts)]
    assert colliding.tolist() == sorted(
        k for k, v in per_key.items() if v > 1)


def test_add_keys_counts_each_added_item_beside_the_held_ones():
    rng = np.random.default_rng(8)
    held = rng.integers(0, 50, 300)
    more = rng.integers(20, 90, 120)  # some keys held already, some not, repeats
    keys, counts = np.unique(held, return_counts=True)
    got_keys, got_counts = add_keys(keys, counts, more)
    want = Counter(held.tolist()) + Counter(more.tolist())
    assert got_keys.tolist() == sorted(want)
    assert got_counts.tolist() == [want[k] for k in sorted(want)]
    assert got_counts.dtype == np.int64
    empty = add_keys(keys, counts, np.zeros(0, np.int64))
    assert np.array_equal(empty[0], keys) and np.array_equal(empty[1], counts)


def test_subtract_rows_is_exact_on_counts_and_last_layer():
    rng = np.random.default_rng(4)
    sizes = (6, 4, 5)
    codes = np.stack([rng.integers(0, k, 900) for k in sizes], axis=1).astype(np.int32)
    sq = rng.random((900, 3)).astype(np.float32)
    x = rng.normal(size=(900, 8)).astype(np.float32)
    drop = rng.random(900) < 0.2
    whole = partial_from_batch(codes, sq, x, sizes, quality_depth=2)
    kept = partial_from_batch(codes[~drop], sq[~drop], x[~drop], sizes, quality_depth=2)
    got = subtract_rows(whole, codes[drop], sq[drop, -1], sizes, quality_depth=2)
    assert got.n == kept.n
    for a, b in zip(got.layer_counts, kept.layer_counts):
        assert np.array_equal(a, b)
    assert np.array_equal(got.sid_keys, kept.sid_keys)
    assert np.array_equal(got.sid_counts, kept.sid_counts)
    for field in ("trans_keys", "trans_counts"):
        for a, b in zip(getattr(got, field), getattr(kept, field)):
            assert np.array_equal(a, b)
    assert got.sq_res_sum[-1] == pytest.approx(kept.sq_res_sum[-1], rel=1e-9)
    assert got.res_norm_sum[-1] == pytest.approx(kept.res_norm_sum[-1], rel=1e-9)
    assert np.array_equal(got.q_keys, kept.q_keys)
    assert np.array_equal(got.q_counts, kept.q_counts)
    # the estimated parts: the mean of the group stands in for each dropped item
    assert got.x_sq_sum == pytest.approx(kept.x_sq_sum, rel=0.05)
    assert got.sq_res_sum[0] == pytest.approx(kept.sq_res_sum[0], rel=0.05)
    # dropping nothing changes nothing
    same = subtract_rows(whole, codes[:0], sq[:0, -1], sizes, quality_depth=2)
    assert same is whole
    # dropping everything leaves exactly nothing, estimated parts included
    none = subtract_rows(whole, codes, sq[:, -1], sizes, quality_depth=2)
    assert none.n == 0 and none.x_sq_sum == 0 and not none.sq_res_sum.any()
    assert not none.res_norm_sum.any() and len(none.q_keys) == 0


def test_free_suffixes_fill_gaps_then_continue():
    keys = np.array([5, 5, 5, 7, 9], dtype=np.int64)
    rank = np.array([0, 1, 2, 0, 1], dtype=np.int32)
    taken_keys = np.array([5, 5, 7, 9, 9, 9], dtype=np.int64)
    taken = np.array([0, 2, 3, 0, 1, 2], dtype=np.int32)
    got = free_suffixes(keys, rank, taken_keys, taken)
    assert got.tolist() == [1, 3, 4, 0, 4]
    # random: new suffixes never meet a held one and stay unique per key
    rng = np.random.default_rng(0)
    for _ in range(20):
        tk = rng.integers(0, 6, 40)
        ts = rng.integers(0, 12, 40)
        pairs = {(int(k), int(s)) for k, s in zip(tk, ts)}
        tk = np.array([p[0] for p in pairs], np.int64)
        ts = np.array([p[1] for p in pairs], np.int32)
        nk = np.sort(rng.integers(0, 8, 30)).astype(np.int64)
        nr = assign_suffixes(nk, np.zeros(30, np.float32), pa.array(np.arange(30)))
        out = free_suffixes(nk, nr, tk, ts)
        new_pairs = [(int(k), int(s)) for k, s in zip(nk, out)]
        assert len(set(new_pairs)) == 30 and not set(new_pairs) & pairs
        for k in np.unique(nk):  # the smallest free suffixes of each key are used
            free = sorted(set(range(60)) - {s for kk, s in pairs if kk == k})
            assert sorted(s for kk, s in new_pairs if kk == k) == free[:int((nk == k).sum())]


def test_free_suffixes_past_long_runs_of_held_suffixes():
    """A SID whose carried items hold a long run of suffixes (a large SID of the parent):
    the new items continue after it, and gaps anywhere in it are filled first."""
    held = {7: list(range(50_000)), 9: list(range(0, 40_000, 2)),
            11: [s for s in range(30_000) if s != 12_345]}
    taken_keys = np.concatenate([np.full(len(v), k, np.int64) for k, v in held.items()])
    taken = np.concatenate([np.array(v, np.int32) for v in held.values()])
    keys = np.array([3] * 2 + [7] * 3 + [9] * 4 + [11] * 2, np.int64)
    rank = np.array([0, 1, 0, 1, 2, 0, 1, 2, 3, 0, 1], np.int32)
    got = free_suffixes(keys, rank, taken_keys, taken)
    assert got.tolist() == [0, 1, 50_000, 50_001, 50_002, 1, 3, 5, 7, 12_345, 30_000]


def test_needs_suffixes_are_colliding_sids_holding_an_item_not_held():
    keys = np.array([2, 4, 6, 8, 10], dtype=np.int64)
    counts = np.array([1, 3, 2, 4, 0], dtype=np.int64)
    assert needs_suffixes(keys, counts).tolist() == [False, True, True, True, False]
    # SID 4 is all held (its suffixes stand); 6 holds one new item beside a held one; 8 is
    # not held at all; a held key of no items may be missing from the counts
    held_keys = np.array([2, 4, 6, 7], dtype=np.int64)
    held_counts = np.array([1, 3, 1, 0], dtype=np.int64)
    got = needs_suffixes(keys, counts, held_keys, held_counts)
    assert got.tolist() == [False, False, True, True, False]
    rng = np.random.default_rng(3)
    for _ in range(20):  # against counting each SID's held and new items
        held = Counter(rng.integers(0, 30, 40).tolist())
        new = Counter(rng.integers(0, 30, 15).tolist())
        every = held + new
        k = np.array(sorted(every), np.int64)
        hk = np.array(sorted(held), np.int64)
        out = needs_suffixes(k, np.array([every[x] for x in k]), hk,
                             np.array([held[x] for x in hk]))
        assert out.tolist() == [every[x] > 1 and new[x] > 0 for x in k]
    with pytest.raises(ValueError, match="held SIDs"):
        needs_suffixes(keys, counts, np.array([5], np.int64), np.array([1], np.int64))


def test_prune_decision_round_trip():
    for decision in (PruneDecision("none", (4, 3)),
                     PruneDecision("top_k", (8, 6, 4), 1, np.array([2, 5], np.int64)),
                     PruneDecision("sarq", (8, 6, 4),
                                   big_prefixes=(np.array([1, 3]), np.array([7, 20, 30])))):
        back = PruneDecision.from_bytes(decision.to_bytes())
        assert (back.strategy, back.sizes, back.layer) == (decision.strategy, decision.sizes,
                                                           decision.layer)
        assert np.array_equal(back.tokens, decision.tokens)
        assert len(back.big_prefixes) == len(decision.big_prefixes)
        for a, b in zip(back.big_prefixes, decision.big_prefixes):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("ranges", [1, 2, 5, 40])
def test_key_range_bounds_keep_each_sid_in_one_range_of_about_equal_items(ranges):
    """Every key lands in exactly one range (searchsorted right), the ranges are cut in key
    order, and each holds about total / ranges items: never more than that plus one SID."""
    rng = np.random.default_rng(4)
    keys = np.unique(rng.integers(0, 10**9, 300)).astype(np.int64)
    counts = rng.integers(2, 60, len(keys))
    counts[17] = 900  # a SID larger than a range's share
    bounds = key_range_bounds(keys, counts, ranges)
    assert len(bounds) == ranges - 1 and np.all(np.diff(bounds) >= 0)
    which = np.searchsorted(bounds, keys, side="right")
    assert which.min() >= 0 and which.max() < ranges and np.all(np.diff(which) >= 0)
    held = np.bincount(which, weights=counts, minlength=ranges)
    assert held.sum() == counts.sum()
    assert held.max() <= counts.sum() / ranges + counts.max()
    # the same key always in the same range: a SID's rows from every shard meet
    rows = rng.choice(keys, 5000)
    assert np.array_equal(np.searchsorted(bounds, rows, side="right"),
                          which[np.searchsorted(keys, rows)])


def test_quality_warnings_name_a_collapsed_layer_and_a_barely_learned_quantizer():
    from semid_dist.codes.metrics import quality_warnings

    def metrics(used: list[int], sizes: list[int], rel: float) -> dict:
        return {"layers": [{"size": k, "used": u} for u, k in zip(used, sizes)],
                "reconstruction": {"relative_error": rel}}

    assert quality_warnings(metrics([250, 200], [256, 256], 0.4), 5000, learned=True) == []
    assert quality_warnings(metrics([401, 4000], [4096, 4096], 0.95), 5000, learned=False) == [
        "layer 0 uses 401 of its 4096 codes for 5000 items: its codebook collapsed, or the "
        "items hold fewer distinct values there (use a smaller layer)"]
    assert quality_warnings(metrics([401], [4096], 0.5), 5000, learned=True) == [
        "layer 0 uses 401 of its 4096 codes for 5000 items: its codebook collapsed, or the "
        "items hold fewer distinct values there (use a lower quantizer.lr, or a smaller "
        "layer)"]
    # what a layer could use is its size or, where fewer, the items; under 10: not said
    assert quality_warnings(metrics([2, 1], [4096, 8], 0.2), 20, learned=False) == []
    assert quality_warnings(metrics([1, 1], [4096, 8], 0.2), 20, learned=False)[0].startswith(
        "layer 0 uses 1 of its 4096 codes for 20 items")
    assert quality_warnings(metrics([16], [16], 0.9), 5000, learned=True) == [
        "relative error 0.900: the learned quantizer reconstructs the items hardly better than "
        "zero vectors would (1.0); train it longer (quantizer.epochs, a smaller "
        "quantizer.batch_size) or with a higher quantizer.lr"]
    assert quality_warnings(metrics([16], [16], 0.95), 5000, learned=False) == []
    tied = {**metrics([16], [16], 0.5), "head": {"items": 5000}, "tail": {"items": 0}}
    assert quality_warnings(tied, 5000, learned=False) == [
        "the head holds all 5000 items and the tail none: every item's popularity is at or "
        "above the head's threshold (the items tied at it join the head), so the head / tail "
        "figures compare nothing; a lower metrics.head_share, or finer popularity values, "
        "split them"]
    split = {**tied, "head": {"items": 4000}, "tail": {"items": 1000}}
    assert quality_warnings(split, 5000, learned=False) == []
    # a re-encode's codebooks change by a new fit only
    assert quality_warnings(metrics([401], [4096], 0.95), 5000, learned=True, reused=True) == [
        "layer 0 uses 401 of its 4096 codes for 5000 items: its codebook collapsed, or the "
        "items hold fewer distinct values there (refit the codebooks (a build without "
        "encode.from_version))",
        "relative error 0.950: the learned quantizer reconstructs the items hardly better than "
        "zero vectors would (1.0); refit the codebooks (a build without "
        "encode.from_version): train it longer (quantizer.epochs, a smaller "
        "quantizer.batch_size) or with a higher quantizer.lr"]
