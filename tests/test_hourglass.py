"""Hourglass diagnostics and head/tail splits against brute-force recomputation."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from semid_dist.codes.headsplit import head_threshold
from semid_dist.codes.hourglass import conditional_stats, hourglass_verdict
from semid_dist.codes.metrics import finalize_metrics, layer_stats
from semid_dist.codes.partials import merge_all, partial_from_batch
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from tests.conftest import small_config

SIZES = [6, 5, 7]


def random_codes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, n) for k in SIZES], axis=1).astype(np.int32)


def brute_transition(codes: np.ndarray, layer: int) -> dict:
    n = len(codes)
    children: dict[int, Counter] = defaultdict(Counter)
    for row in codes:
        children[int(row[layer - 1])][int(row[layer])] += 1
    cond_h, top, n_children = 0.0, 0.0, []
    parents_of: dict[int, set] = defaultdict(set)
    for parent, cnt in children.items():
        total = sum(cnt.values())
        h = -sum(c / total * math.log(c / total) for c in cnt.values())
        cond_h += total / n * h
        top += total / n * max(cnt.values()) / total
        n_children.append(len(cnt))
        for child in cnt:
            parents_of[child].add(parent)
    in_degree = {child: len(p) for child, p in parents_of.items()}
    return {"h": cond_h, "top": top, "children": float(np.mean(n_children)),
            "in_degree": in_degree}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conditional_stats_match_brute_force(seed):
    codes = random_codes(400, seed)
    x = np.random.default_rng(seed).normal(size=(400, 4)).astype(np.float32)
    p = partial_from_batch(codes, np.ones((400, 3), np.float32), x, SIZES, quality_depth=2)
    stats = conditional_stats(p.trans_keys, p.trans_counts, SIZES)
    for layer in (1, 2):
        got, want = stats[layer - 1], brute_transition(codes, layer)
        assert (got["from_layer"], got["to_layer"]) == (layer - 1, layer)
        assert got["conditional_entropy"] == pytest.approx(want["h"], rel=1e-12)
        assert got["conditional_entropy_norm"] == pytest.approx(
            want["h"] / math.log(SIZES[layer]), rel=1e-12)
        assert got["mean_top_share"] == pytest.approx(want["top"], rel=1e-12)
        assert got["mean_children_per_parent"] == pytest.approx(want["children"])
        assert got["in_degree"]["max"] == max(want["in_degree"].values())
        for entry in got["in_degree"]["top"]:
            assert entry["in_degree"] == want["in_degree"][entry["token"]]
            assert entry["items"] == int((codes[:, layer] == entry["token"]).sum())
        ranked = [e["in_degree"] for e in got["in_degree"]["top"]]
        assert ranked == sorted(ranked, reverse=True)


def test_merged_conditional_stats_equal_single_pass():
    codes = random_codes(900, 3)
    x = np.random.default_rng(3).normal(size=(900, 4)).astype(np.float32)
    ones = np.ones((900, 3), np.float32)
    whole = partial_from_batch(codes, ones, x, SIZES, quality_depth=2)
    parts = [partial_from_batch(codes[a:b], ones[a:b], x[a:b], SIZES, quality_depth=2)
             for a, b in ((0, 100), (100, 650), (650, 900))]
    merged = merge_all(parts)
    assert (conditional_stats(merged.trans_keys, merged.trans_counts, SIZES)
            == conditional_stats(whole.trans_keys, whole.trans_counts, SIZES))


def test_known_hourglass_is_detected_and_even_layers_are_not():
    rng = np.random.default_rng(4)
    n = 2000
    neck = np.where(rng.random(n) < 0.8, 0, rng.integers(0, 8, n))  # 80% of items on token 0
    codes = np.stack([rng.integers(0, 8, n), neck, rng.integers(0, 8, n)], axis=1)
    layers = [{"layer": i, **layer_stats(np.bincount(codes[:, i], minlength=8))}
              for i in range(3)]
    verdict = hourglass_verdict(layers)
    assert verdict["detected"] and verdict["layer"] == 1
    assert "hourglass at layer 1" in verdict["verdict"]
    even = [{"layer": i, **layer_stats(np.bincount(rng.integers(0, 8, n), minlength=8))}
            for i in range(3)]
    assert not hourglass_verdict(even)["detected"]
    assert not hourglass_verdict(layers[:2])["detected"]  # no middle layer with 2 layers


def test_routing_neck_has_the_largest_in_degree():
    rng = np.random.default_rng(5)
    n = 3000
    child = np.where(rng.random(n) < 0.5, 3, rng.integers(0, 5, n))
    codes = np.stack([rng.integers(0, 6, n), child, rng.integers(0, 7, n)], axis=1)
    p = partial_from_batch(codes.astype(np.int32), np.ones((n, 3), np.float32),
                           np.ones((n, 2), np.float32), SIZES, quality_depth=1)
    top = conditional_stats(p.trans_keys, p.trans_counts, SIZES)[0]["in_degree"]["top"][0]
    assert top["token"] == 3 and top["share"] > 0.5


def test_head_and_tail_figures_partition_the_catalog(small_catalog, tmp_path):
    catalog, x = small_catalog
    res = build(small_config(catalog, str(tmp_path), input__popularity_column="popularity",
                             metrics__head_share=0.5), log=lambda m: None)
    pop = np.arange(len(x)) % 97  # tests/conftest.write_catalog's popularity column
    t = head_threshold(pop, 0.5)
    m = res.metrics
    assert m["head"]["items"] == int((pop >= t).sum())
    assert m["head"]["items"] + m["tail"]["items"] == len(x)
    table = TableStore(str(tmp_path), "sids").read_data().sort_by("item_id").to_pandas()
    codes = np.array(table["codes"].tolist())
    head = pop[table["item_id"].to_numpy()] >= t
    for part, rows in (("head", head), ("tail", ~head)):
        for layer in range(3):
            counts = np.bincount(codes[rows, layer], minlength=m["layers"][layer]["size"])
            assert m[part]["layers"][layer]["used"] == int((counts > 0).sum())
            assert m[part]["layers"][layer]["gini"] == pytest.approx(
                layer_stats(counts)["gini"])
        err = table["qerr"].to_numpy()[rows]
        assert m[part]["reconstruction"]["mse"] == pytest.approx(float(err.mean()), rel=1e-4)


def test_finalize_metrics_sections_present_for_one_item():
    codes = np.array([[1, 2, 3]], np.int32)
    p = partial_from_batch(codes, np.ones((1, 3), np.float32), np.ones((1, 2), np.float32),
                           SIZES, quality_depth=2)
    m = finalize_metrics(p, SIZES, quality_depth=2)
    assert m["conditional"][0]["conditional_entropy"] == 0.0
    assert m["hourglass"]["detected"] is False


def test_a_layer_with_one_token_or_none_has_zero_entropy_and_its_perplexity():
    one = layer_stats(np.array([0, 7, 0, 0]))
    assert one["entropy"] == 0.0 and math.copysign(1, one["entropy"]) == 1.0  # not -0.0
    assert one["perplexity"] == 1.0 and one["used"] == 1
    empty = layer_stats(np.zeros(4, np.int64))  # a layer pruning dropped
    assert empty["used"] == 0 and empty["perplexity"] == 0.0
    assert math.copysign(1, empty["entropy"]) == 1.0 and empty["entropy_norm"] == 0.0
    assert json.dumps(empty).count("-0.0") == 0
