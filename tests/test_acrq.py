"""ACRQ (anchored curriculum residual k-means): frozen anchors, the two stages, resume, the
build path and its config checks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from semid_dist.errors import ConfigError, InputError
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from semid_dist.quantize import encode_batch
from semid_dist.quantize.acrq import fit_acrq, split_sample
from semid_dist.quantize.kmeans import kmeans, kmeans_plusplus
from semid_dist.quantize.residual import fit_residual_kmeans
from semid_dist.stages import JobContext, load_quantizer
from tests.conftest import clustered, small_config

LAYERS, ANCHORS = (16, 12, 12), (6, 6, 8)


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def head_tail():
    """Head items from some clusters, tail items from others (plus a few shared)."""
    x = clustered(3000, 10, clusters=30, seed=4)
    rng = np.random.default_rng(2)
    head = rng.random(len(x)) < 0.4
    x[~head] += np.float32(2.0)  # the tail lives partly elsewhere: it needs its own codewords
    return x, head


def test_kmeans_keeps_frozen_centroids_bit_identical(head_tail):
    x, head = head_tail
    anchors, _ = kmeans(x[head], 6, niter=5, seed=0)
    cb, st = kmeans(x[~head], 14, niter=8, seed=1, frozen=anchors)
    assert cb.shape == (14, 10) and st["init"] == "anchored"
    assert np.array_equal(cb[:6], anchors)
    # the extension moved to where the tail is: it serves the tail better than the anchors
    d_anchor = ((x[~head, None, :] - anchors[None]) ** 2).sum(-1).min(1).mean()
    d_all = ((x[~head, None, :] - cb[None]) ** 2).sum(-1).min(1).mean()
    assert d_all < 0.7 * d_anchor
    with pytest.raises(ValueError, match="0 < a < k"):
        kmeans(x, 6, niter=1, frozen=anchors)


def test_kmeans_plusplus_continues_from_the_anchors_and_splits_extensions_only():
    """Points sitting on the anchors have distance 0, so k-means++ continued from the
    anchors must pick the far points; extensions left empty are re-split among themselves,
    never from an anchor."""
    anchors = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    far = np.array([[0.0, 50.0], [50.0, 50.0], [-50.0, 50.0]], np.float32)
    x = np.concatenate([np.repeat(anchors, 40, axis=0), far])
    picked = kmeans_plusplus(x, 3, seed=0, start=anchors)
    assert sorted(map(tuple, picked.tolist())) == sorted(map(tuple, far.tolist()))
    # 6 extensions for 3 far points: 3 stay empty every iteration and are re-split
    cb, st = kmeans(x, 8, niter=4, seed=0, frozen=anchors)
    assert np.array_equal(cb[:2], anchors)
    assert sum(it["empty_split"] for it in st["iterations"]) > 0


def test_fit_acrq_anchors_are_the_head_fit_and_stay_frozen(head_tail):
    x, head = head_tail
    split = split_sample(x, head, LAYERS, ANCHORS, seed=3)
    books, stats = fit_acrq(x, head, LAYERS, ANCHORS, split, niter=6, seed=3)
    head_books, _ = fit_residual_kmeans(x[head], ANCHORS, niter=6, seed=3,
                                        init_points=split.head_seeds)
    for layer, (cb, anchor) in enumerate(zip(books, head_books)):
        assert cb.shape == (LAYERS[layer], 10)
        assert np.array_equal(cb[:ANCHORS[layer]], anchor), layer  # bit-identical anchors
        assert stats[layer]["anchors"] == ANCHORS[layer]
        assert stats[layer]["init"] == "anchored" and stats[layer]["head"]["k"] == ANCHORS[layer]
    # tail items use the extension codewords; the hybrid codebooks reconstruct the tail
    # better than the head codebooks alone
    codes = encode_batch(books, x[~head]).codes
    assert (codes[:, 0] >= ANCHORS[0]).mean() > 0.2
    tail_hybrid = encode_batch(books, x[~head]).qerr.mean()
    tail_head_only = encode_batch(head_books, x[~head]).qerr.mean()
    assert tail_hybrid < 0.8 * tail_head_only


def test_fit_acrq_resumes_from_any_step(head_tail):
    x, head = head_tail
    split = split_sample(x, head, LAYERS, ANCHORS, seed=3)
    steps = []

    def record(step, books, stats):
        steps.append((step, [b.copy() for b in books], list(stats)))

    books, _ = fit_acrq(x, head, LAYERS, ANCHORS, split, niter=4, seed=3, on_layer=record)
    assert [s for s, _, _ in steps] == list(range(2 * len(LAYERS)))
    for step in (1, len(LAYERS) - 1, len(LAYERS) + 1):  # mid stage 1, end of it, mid stage 2
        _, done_books, done_stats = steps[step]
        again, st = fit_acrq(x, head, LAYERS, ANCHORS, split, niter=4, seed=3,
                             fitted=list(zip(done_books, done_stats)))
        assert len(again) == len(books), step
        assert all(np.array_equal(a, b) for a, b in zip(again, books)), step


def test_split_sample_errors(head_tail):
    x, head = head_tail
    with pytest.raises(InputError, match="head rows, fewer than the largest anchor"):
        split_sample(x, np.zeros(len(x), bool) | (np.arange(len(x)) < 5), LAYERS, ANCHORS,
                     seed=0)
    with pytest.raises(InputError, match="tail rows, fewer than the largest extension"):
        split_sample(x, np.arange(len(x)) > 3, LAYERS, ANCHORS, seed=0)
    with pytest.raises(InputError, match="all null, zero or equal values"):
        split_sample(x, np.zeros(len(x), bool), LAYERS, ANCHORS, seed=0)


def test_acrq_build_encodes_like_residual_kmeans(small_catalog, tmp_path):
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    opts = {"quantizer__method": "acrq", "quantizer__layers": [16, 8, 8],
            "quantizer__anchor_layers": [4, 6, 6], "input__popularity_column": "popularity"}
    res = build(small_config(catalog, root, **opts), log=quiet)
    store = TableStore(root, "sids")
    meta = store.read_json(res.version_id, "codebooks/codebooks.json")
    assert meta["method"] == "acrq" and meta["anchor_layers"] == [4, 6, 6]
    assert [s["anchors"] for s in meta["training"]] == [4, 6, 6]
    ctx = JobContext(catalog_url=catalog, id_column="item_id", embedding_column="embedding",
                     popularity_column=None, dim=x.shape[1], sizes=(16, 8, 8), root=root,
                     table="sids", version_id=res.version_id, quality_depth=2)
    q = load_quantizer(ctx)
    assert q.method == "acrq" and q.sizes == (16, 8, 8)
    t = store.read_data().sort_by("item_id")
    codes = np.array(t.column("codes").to_pylist())
    assert np.array_equal(codes, q.encode(x).codes)
    # `semid encode` reuses acrq codebooks (same method), with the capacity bound too
    again = build(small_config(catalog, root, encode__from_version=res.version_id,
                               collisions__max_per_sid=4, **opts), log=quiet)
    assert again.metrics["fit"]["codebooks_from"] == res.version_id
    per_sid = Counter(map(tuple, store.read_data(again.version_id).column("sid").to_pylist()))
    collisions = again.metrics["collisions"]  # (2,400 items in 16 x 8 x 8 SIDs: many remain)
    assert collisions["reassigned"] > 0 and collisions["over_capacity"] == {
        "sids": sum(c > 4 for c in per_sid.values()),
        "items": sum(c - 4 for c in per_sid.values() if c > 4),
        "pruned_sids": 0, "pruned_items": 0}
    before = Counter(map(tuple, store.read_data(res.version_id).column("sid").to_pylist()))
    assert sum(max(c - 4, 0) for c in per_sid.values()) < sum(
        max(c - 4, 0) for c in before.values())  # the moves took items out of over-full SIDs
    with pytest.raises(ConfigError, match="holds an? acrq quantizer"):
        build(small_config(catalog, root, encode__from_version=res.version_id), log=quiet)
    # a catalog of new items without popularity can be encoded with ACRQ codebooks
    plain = small_config(catalog, root, encode__from_version=res.version_id,
                         **{**opts, "input__popularity_column": None})
    assert build(plain, log=quiet).manifest["rows"]["encoded"] == len(x)
    with pytest.raises(ConfigError, match="set quantizer.acrq_base=rq_kmeans"):
        build(small_config(catalog, root, encode__from_version=res.version_id,
                           quantizer__acrq_base="rq_vae", **opts), log=quiet)


@pytest.mark.parametrize("over, message", [
    ({"quantizer__anchor_layers": [8, 4]}, "has 2 sizes"),
    ({"quantizer__anchor_layers": [16, 4, 4]}, r"must be in \[1, 15\]"),
    ({"quantizer__anchor_layers": [8, 6, 4]}, "must not decrease"),
    ({"input__popularity_column": None}, "set input.popularity_column"),
    ({"fit__warm_start": "parent"}, "not supported by quantizer.method=acrq"),
    ({"metrics__head_share": 1.0}, r"1.0 leaves ACRQ's head or tail empty"),
    ({"metrics__head_share": 0.0}, r"strictly between 0 and 1"),
])
def test_acrq_config_errors(over, message, tmp_path):
    opts = {"quantizer__method": "acrq", "quantizer__layers": [16, 8, 8],
            "input__popularity_column": "popularity", **over}
    with pytest.raises(ConfigError, match=message):
        small_config("cat", str(tmp_path), **opts)


def test_acrq_default_anchors_and_keys_of_other_methods(tmp_path):
    default = small_config("cat", str(tmp_path), quantizer__method="acrq",
                           quantizer__layers=[16, 8, 8], input__popularity_column="popularity")
    assert default.anchor_sizes == (4, 4, 4)  # half the smallest layer, valid for any sizes
    with pytest.raises(ConfigError, match="are for quantizer.method=acrq"):
        small_config("cat", str(tmp_path), quantizer__anchor_layers=[4, 4, 4])
