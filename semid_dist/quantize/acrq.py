"""ACRQ, anchored curriculum residual quantization (paper 002, section 2.2), on residual
k-means.

Stage 1 (curriculum for head items): residual k-means on the head of the sample (the most
popular items) with the anchor sizes a_l, non-decreasing over the layers, so the early
layers hold coarse, robust semantics. Stage 2 (anchored transfer for tail items): residual
k-means on the tail with each layer's codebook = the stage-1 anchors (frozen, bit-identical)
+ k_l - a_l extension centroids (trainable; k-means++ continues from the anchors). The
result is a plain list of L codebooks (k_l, d): it encodes like rq_kmeans, every engine and
the capacity bound included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from semid_dist.errors import InputError
from semid_dist.quantize.kmeans import AllReduce
from semid_dist.quantize.residual import OnLayer, fit_residual_kmeans, init_subset

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AcrqSample:
    """The fit sample's head / tail split. head: (n,) bool over the sample rows (popularity
    at or above the head threshold); head_seeds / tail_seeds: the k-means++ seeding points of
    each stage, held identically by every worker."""

    head: np.ndarray
    head_seeds: np.ndarray
    tail_seeds: np.ndarray


def split_sample(sample: np.ndarray, head: np.ndarray, layers: tuple[int, ...] | list[int],
                 anchors: tuple[int, ...] | list[int], *, seed: int) -> AcrqSample:
    """Check both stages have enough rows and pick their seeding points."""
    n_head, n_tail = int(head.sum()), int((~head).sum())
    need_head = max(anchors)
    need_tail = max(k - a for k, a in zip(layers, anchors))
    if n_head < need_head:
        raise InputError(f"acrq: the fit sample holds {n_head} head rows, fewer than the "
                         f"largest anchor codebook ({need_head}); raise metrics.head_share "
                         "or fit.sample_size, or use smaller quantizer.anchor_layers")
    if n_tail < need_tail:
        raise InputError(f"acrq: the fit sample holds {n_tail} tail rows, fewer than the "
                         f"largest extension ({need_tail} codewords); lower "
                         "metrics.head_share or raise fit.sample_size")
    return AcrqSample(head=head,
                      head_seeds=init_subset(sample[head], need_head, seed=seed),
                      tail_seeds=init_subset(sample[~head], need_tail, seed=seed + 1))


def fit_acrq(x: np.ndarray, head: np.ndarray, layers: tuple[int, ...] | list[int],
             anchors: tuple[int, ...] | list[int], split: AcrqSample, *, niter: int = 20,
             seed: int = 0, all_reduce: AllReduce | None = None, chunk_rows: int = 8192,
             device: str = "cpu", progress: Progress | None = None,
             fitted: list[tuple[np.ndarray, dict[str, Any]]] | None = None,
             on_layer: OnLayer | None = None) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """x: (n_local, d) this worker's rows of the sample, head: their (n_local,) head flags.

    Checkpoints count 2L steps: stage 1's L anchor codebooks, then stage 2's L full ones
    (`fitted` / `on_layer` as in `fit_residual_kmeans`, step index and codebooks so far).
    Returns (L codebooks (k_l, d) float32 whose first a_l rows are the anchors, per-layer
    stats with both stages')."""
    n_layers = len(layers)
    done = fitted or []

    def say(stage: str) -> Progress | None:
        return None if progress is None else (lambda msg: progress(f"acrq {stage}: {msg}"))

    def stage1_layer(layer: int, books: list[np.ndarray], stats: list[dict[str, Any]]) -> None:
        if on_layer is not None:
            on_layer(layer, books, stats)

    anchor_books, anchor_stats = fit_residual_kmeans(
        x[head], anchors, niter=niter, seed=seed, init_points=split.head_seeds,
        all_reduce=all_reduce, chunk_rows=chunk_rows, device=device, progress=say("head"),
        fitted=done[:n_layers] or None, on_layer=stage1_layer)

    def stage2_layer(layer: int, books: list[np.ndarray], stats: list[dict[str, Any]]) -> None:
        if on_layer is not None:
            on_layer(n_layers + layer, anchor_books + books, anchor_stats + stats)

    books, tail_stats = fit_residual_kmeans(
        x[~head], layers, niter=niter, seed=seed + 7, init_points=split.tail_seeds,
        all_reduce=all_reduce, chunk_rows=chunk_rows, device=device, progress=say("tail"),
        fitted=done[n_layers:] or None, on_layer=stage2_layer, anchors=anchor_books)
    stats = [{**tail, "layer": layer, "anchors": int(anchors[layer]),
              "head": {k: v for k, v in head_st.items() if k != "layer"}}
             for layer, (tail, head_st) in enumerate(zip(tail_stats, anchor_stats))]
    return books, stats
