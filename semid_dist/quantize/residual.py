"""Residual k-means (RQ-KMeans): per layer, k-means on the residual of the layers before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from semid_dist.errors import ConfigError
from semid_dist.quantize.encode import nearest
from semid_dist.quantize.kmeans import AllReduce, kmeans

Progress = Callable[[str], None]
OnLayer = Callable[[int, list[np.ndarray], list[dict[str, Any]]], None]


def fit_residual_kmeans(x: np.ndarray, layers: tuple[int, ...] | list[int], *, niter: int = 20,
                        seed: int = 0, init_points: np.ndarray | None = None,
                        init_centroids: list[np.ndarray] | None = None,
                        all_reduce: AllReduce | None = None, chunk_rows: int = 8192,
                        device: str = "cpu", progress: Progress | None = None,
                        fitted: list[tuple[np.ndarray, dict[str, Any]]] | None = None,
                        on_layer: OnLayer | None = None,
                        anchors: list[np.ndarray] | None = None,
                        ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Fit one codebook per layer on the residuals.

    x: (n_local, d) float32, this worker's shard of the sample. init_points: (m, d) float32
    held identically by every worker (k-means++ seeding); defaults to x. init_centroids:
    warm start, one (k_l, d) array per layer held identically by every worker (e.g. the
    parent version's codebooks, see `check_warm_start`); each layer's Lloyd iterations then
    start from it instead of k-means++. Layer sizes may differ. fitted: (codebook, stats) of
    the first layers, already fitted by an interrupted run (a checkpoint): they are applied,
    not refitted, and the result equals an uninterrupted fit. on_layer(layer, codebooks so
    far, stats so far) runs after each layer (to checkpoint). anchors: one (a_l, d) array
    per layer, a_l < k_l, kept frozen as the first a_l centroids of the layer (ACRQ stage
    2, see `kmeans`). Returns (codebooks: L arrays (k_l, d) float32, per-layer k-means stats).
    """
    if init_centroids is not None and len(init_centroids) != len(layers):
        raise ValueError(f"init_centroids holds {len(init_centroids)} layers, expected "
                         f"{len(layers)}")
    residual = np.array(x, dtype=np.float32, copy=True)
    seeds = None
    if init_centroids is None:
        seeds = residual if init_points is None else np.array(init_points, np.float32, copy=True)
    codebooks: list[np.ndarray] = []
    stats: list[dict[str, Any]] = []
    for layer, k in enumerate(layers):
        warm = None if init_centroids is None else init_centroids[layer]
        if fitted is not None and layer < len(fitted):
            cb, st = fitted[layer][0], {**fitted[layer][1], "from_checkpoint": True}
        else:
            cb, st = kmeans(residual, k, niter=niter, seed=seed + 1000 * layer,
                            init_points=seeds, init_centroids=warm, all_reduce=all_reduce,
                            chunk_rows=chunk_rows, device=device,
                            frozen=None if anchors is None else anchors[layer])
            st = {"layer": layer, **st}
        labels, _ = nearest(residual, cb, chunk_rows=chunk_rows, device=device)
        residual -= cb[labels]
        if seeds is not None and seeds is not residual:
            seed_labels, _ = nearest(seeds, cb, chunk_rows=chunk_rows, device=device)
            seeds -= cb[seed_labels]
        codebooks.append(cb)
        stats.append(st)
        restored = fitted is not None and layer < len(fitted)
        if on_layer is not None and not restored:
            on_layer(layer, codebooks, stats)
        if progress is not None and not restored:  # (a restored layer's line was said)
            progress(f"layer {layer}: k={k} init={st['init']} mse={st['final_mse']:.6g} "
                     f"empty_splits={sum(h['empty_split'] for h in st['iterations'])}")
    return codebooks, stats


def check_warm_start(codebooks: list[np.ndarray], layers: tuple[int, ...] | list[int], dim: int,
                     *, source: str) -> list[np.ndarray]:
    """Validate codebooks to warm-start from against the layer sizes and dimension asked for.

    codebooks: L' arrays (k'_l, d') float32 (e.g. of the parent version); layers: the L sizes
    k_l of this fit; dim: d of the catalog. Returns the codebooks as float32 or raises
    `ConfigError` naming both shapes and `source` (where the codebooks come from).
    """
    have = [int(len(cb)) for cb in codebooks]
    want = [int(k) for k in layers]
    dims = sorted({int(cb.shape[1]) for cb in codebooks})
    if dims != [dim]:  # first: no other setting mends it (a new embedding model's catalog)
        raise ConfigError(f"fit.warm_start=parent: embedding dim {dim} != codebook dim "
                          f"{dims[0] if len(dims) == 1 else dims} ({source}); set "
                          "fit.warm_start=none to fit from scratch")
    if have != want:
        raise ConfigError(f"fit.warm_start=parent: quantizer.layers={want} but {source} has "
                          f"layers {have}; set quantizer.layers={have} or fit.warm_start=none")
    return [np.ascontiguousarray(cb, dtype=np.float32) for cb in codebooks]


def init_subset(sample: np.ndarray, k_max: int, *, seed: int, per_centroid: int = 8) -> np.ndarray:
    """The k-means++ seeding points every worker holds: a seeded subset of the whole sample
    (at most `per_centroid * k_max + 1024` rows, in sample order)."""
    m = min(len(sample), per_centroid * k_max + 1024)
    if m == len(sample):
        return sample
    idx = np.sort(np.random.default_rng([seed, 2]).choice(len(sample), m, replace=False))
    return sample[idx]
