"""k-means over mergeable statistics.

Each Lloyd iteration computes per-centroid sums and counts on the local shard, hands them
to `all_reduce` (element-wise sum over workers; identity when running alone), and every
worker applies the same update. So an N-worker run is exact data-parallel k-means, and its
centroids are the 1-worker run's bit for bit: the sums are of the values rounded to a
common fixed point (`group_sum`'s `scale`, chosen from the whole sample's largest value
and size), exact integers in any order (float64 sums of the values as they are differed
with the workers' split of the rows in their last bits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from semid_dist.quantize.encode import nearest
from semid_dist.quantize.group_sum import exact_scale, group_sum

AllReduce = Callable[[np.ndarray], np.ndarray]


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def lloyd_stats(x: np.ndarray, centroids: np.ndarray, *, chunk_rows: int = 8192,
                device: str = "cpu", scale: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Sufficient statistics of one assignment pass.

    x: (n, d) float32, centroids: (k, d) float32 ->
    (sums (k, d) float64, counts (k,) float64, inertia = sum of squared distances).
    scale: the sums are of x times `scale` rounded to integers (`group_sum`): exact.
    """
    k, d = centroids.shape
    labels, dists = nearest(x, centroids, chunk_rows=chunk_rows, device=device)
    sums = group_sum(labels, x, k, scale=scale)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return sums, counts, float(dists.astype(np.float64).sum())


# float64's binary exponents (`math.frexp`'s, of its finite values), for `_sample_scale`
_EXPONENTS = np.arange(-1073, 1025)


def _sample_scale(x: np.ndarray, reduce: AllReduce) -> float:
    """`exact_scale` of the whole sample: its size and its largest value in size, over the
    workers (`reduce` sums; the largest exponent is the highest bin of a summed one-hot)."""
    top = max(float(x.max()), -float(x.min())) if x.size else 0.0  # (no copy of x)
    if not math.isfinite(top):
        raise ValueError(f"k-means: the rows hold a non-finite value ({top}); only finite "
                         "rows can be fitted")
    # (a worker without rows, or whose rows are all 0, adds no bin: it sets no exponent)
    onehot = (_EXPONENTS == math.frexp(top)[1]) if top > 0 else np.zeros(len(_EXPONENTS), bool)
    summed = reduce(np.concatenate([[len(x)], onehot.astype(np.float64)]))
    bins = np.flatnonzero(summed[1:])
    top = math.ldexp(0.5, int(_EXPONENTS[bins[-1]])) if len(bins) else 0.0
    return exact_scale(top, int(summed[0]))


def kmeans_plusplus(x: np.ndarray, k: int, *, seed: int,
                    start: np.ndarray | None = None) -> np.ndarray:
    """k-means++ seeding (D^2 sampling). x: (n, d) float32 with n >= k -> (k, d) float32.
    start: centres already chosen (e.g. frozen anchors): the k new ones are drawn by their
    squared distance to the nearest centre so far, starting with these."""
    n = len(x)
    if n < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    rng = np.random.default_rng(seed)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    x_sq = (x32.astype(np.float64) ** 2).sum(axis=1)
    chosen = np.full(k, -1, dtype=np.int64)

    def d2(i: int) -> np.ndarray:
        return np.maximum(x_sq + x_sq[i] - 2.0 * (x32 @ x32[i]).astype(np.float64), 0.0)

    if start is None or len(start) == 0:
        chosen[0] = rng.integers(n)
        min_d2, first = d2(int(chosen[0])), 1
    else:
        min_d2, first = nearest(x32, np.ascontiguousarray(start, np.float32))[1], 0
        min_d2 = np.maximum(min_d2.astype(np.float64), 0.0)
    for j in range(first, k):
        total = min_d2.sum()
        if total <= 0.0:  # fewer distinct points than k: take unchosen points in order
            pick = int(np.flatnonzero(~np.isin(np.arange(n), chosen[:j]))[0])
        else:
            pick = int(np.searchsorted(np.cumsum(min_d2), rng.random() * total, side="right"))
            pick = min(pick, n - 1)
        chosen[j] = pick
        np.minimum(min_d2, d2(pick), out=min_d2)
        min_d2[pick] = 0.0
    return x32[chosen].copy()


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed empty clusters by splitting the largest one (in place). Returns how many."""
    empty = np.flatnonzero(counts == 0)
    d = centroids.shape[1]
    for j in empty:
        i = int(np.argmax(counts))
        if counts[i] <= 1:
            break
        eps = (rng.random(d) - 0.5) * 1e-4 * (np.abs(centroids[i]).mean() + 1e-12)
        centroids[j] = centroids[i] + eps
        centroids[i] = centroids[i] - eps
        counts[j] = counts[i] / 2
        counts[i] -= counts[j]
    return len(empty)


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0,
           init_points: np.ndarray | None = None, init_centroids: np.ndarray | None = None,
           all_reduce: AllReduce | None = None, chunk_rows: int = 8192,
           device: str = "cpu", frozen: np.ndarray | None = None,
           ) -> tuple[np.ndarray, dict[str, Any]]:
    """Lloyd k-means with k-means++ init, or a warm start from given centroids.

    x: (n_local, d) float32, this worker's shard. init_points: points every worker holds
    identically, seeded by k-means++ (defaults to x: only right when running alone).
    init_centroids: (k, d) starting centroids held identically by every worker (e.g. the
    previous version's codebook); replaces the k-means++ seeding, `init_points` is then unused.
    all_reduce: sums an array over workers. Returns (centroids (k, d) float32, stats) where
    stats["iterations"] holds per-iteration mean squared distance and empty-cluster splits
    and stats["init"] is "kmeans++" or "warm".

    frozen: (a, d) float32 centroids that stay exactly as given (ACRQ anchors): they are the
    first a of the k centroids; points are assigned over all k, and only the k - a others
    are updated (k-means++ continues from the frozen ones; empty ones are re-split among
    themselves). stats["init"] is then "anchored".
    """
    reduce = all_reduce or _identity
    a = 0 if frozen is None else len(frozen)
    if frozen is not None:
        if not 0 < a < k or frozen.shape[1] != x.shape[1]:
            raise ValueError(f"frozen has shape {frozen.shape}, expected (a, {x.shape[1]}) "
                             f"with 0 < a < k={k}")
        seeds = x if init_points is None else init_points
        centroids = np.concatenate([frozen, kmeans_plusplus(seeds, k - a, seed=seed,
                                                            start=frozen)]).astype(np.float64)
    elif init_centroids is not None:
        if init_centroids.shape != (k, x.shape[1]):
            raise ValueError(f"init_centroids has shape {init_centroids.shape}, expected "
                             f"({k}, {x.shape[1]})")
        centroids = np.array(init_centroids, dtype=np.float64, copy=True)
    else:
        seeds = x if init_points is None else init_points
        centroids = kmeans_plusplus(seeds, k, seed=seed).astype(np.float64)
    rng = np.random.default_rng([seed, 1])
    scale = _sample_scale(x, reduce)
    history = []
    for it in range(niter):
        start = time.perf_counter()
        sums, counts, inertia = lloyd_stats(x, centroids.astype(np.float32),
                                            chunk_rows=chunk_rows, device=device, scale=scale)
        packed = reduce(np.concatenate([sums.ravel(), counts, [inertia, len(x)]]))
        sums = packed[: k * x.shape[1]].reshape(k, -1) / scale
        counts = packed[k * x.shape[1]: -2].copy()
        inertia, n_total = packed[-2], packed[-1]
        nonempty = counts > 0
        nonempty[:a] = False
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        n_split = _split_empty(centroids[a:], counts[a:], rng)
        history.append({"iteration": it, "mse": float(inertia / max(n_total, 1)),
                        "empty_split": n_split, "seconds": time.perf_counter() - start})
    stats = {"k": k, "n": int(n_total), "iterations": history,
             "init": ("anchored" if frozen is not None else
                      "kmeans++" if init_centroids is None else "warm"),
             "final_mse": history[-1]["mse"] if history else None}
    return centroids.astype(np.float32), stats
