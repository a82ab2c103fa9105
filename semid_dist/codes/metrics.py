"""Metrics of a SID assignment, computed from a merged `Partial`.

Definitions (DESIGN.md): entropy in nats over a layer's token frequencies; entropy_norm =
entropy / ln(size); perplexity = exp(entropy); gini over the counts of all `size` tokens
(unused ones count as 0); utilization = used / size; std = population std of the `size`
counts; top_share = largest count / N; sparsity = distinct prefixes / min(N, prod of sizes
up to that depth); unique_sid_rate = items whose SID is shared with no other item / N;
items-per-SID quantile q = smallest c such that at least a share q of SIDs hold <= c items.
Semantic cohesion (paper 003 eq. 8-9) averages, over clusters of >= 2 items, the mean
pairwise cosine (|s|^2 - n) / (n (n - 1)) with s the sum of unit vectors; preference
discrimination (eq. 10) is log of the mean over cluster pairs of exp(-t (1 - cos)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from semid_dist.codes.hourglass import conditional_stats, hourglass_verdict
from semid_dist.codes.keyset import unique_sorted
from semid_dist.codes.partials import Partial
from semid_dist.codes.pruning import (
    PruneDecision,
    codes_of_keys,
    final_keys,
    kept_layers,
    layer_counts_after,
)

QUANTILES = ("0.8", "0.9", "0.99", "0.999")


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = perfectly even)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))
    total, k = c.sum(), len(c)
    if total == 0 or k == 0:
        return 0.0
    ranks = np.arange(1, k + 1)
    return float(((2 * ranks - k - 1) * c).sum() / (k * total))


def layer_stats(counts: np.ndarray) -> dict[str, float]:
    """Distribution figures of one layer's token counts (k,) int."""
    c = np.asarray(counts, dtype=np.float64)
    n, size = c.sum(), len(c)
    p = c[c > 0] / n if n > 0 else np.zeros(0)
    entropy = float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: one token or none gives 0, not -0
    used = int((c > 0).sum())
    return {"size": size, "used": used, "utilization": used / size, "entropy": entropy,
            "entropy_norm": entropy / math.log(size) if size > 1 else 0.0,
            "perplexity": math.exp(entropy) if n > 0 else 0.0,  # no item: no token in use
            "gini": gini(c), "std": float(c.std()),
            "top_share": float(c.max() / n) if n > 0 else 0.0}


def quantile_from_sizes(sizes: np.ndarray, q: float) -> int:
    """Smallest c with share(SIDs holding <= c items) >= q."""
    s = np.sort(sizes)
    idx = max(0, math.ceil(q * len(s)) - 1)
    return int(s[min(idx, len(s) - 1)])


def collision_stats(sid_counts: np.ndarray, n: int,
                    held: np.ndarray | None = None) -> dict[str, Any]:
    """Collision figures of `n` items over SIDs holding `sid_counts` items each. held: for a
    subset of a table's items (the popular head), how many of the `n` hold each SID, whose
    `sid_counts` are then the whole table's items: a subset item is unique when no item of
    the table shares its SID."""
    held = sid_counts if held is None else held
    return {
        "distinct_sids": int(len(sid_counts)),
        "unique_sid_rate": float(held[sid_counts == 1].sum() / n) if n else 0.0,
        "mean_items_per_sid": float(sid_counts.mean()) if len(sid_counts) else 0.0,
        "max_items_per_sid": int(sid_counts.max()) if len(sid_counts) else 0,
        "items_per_sid_quantiles": {q: quantile_from_sizes(sid_counts, float(q))
                                    for q in QUANTILES} if len(sid_counts) else {},
    }


def prefix_stats(sid_keys: np.ndarray, sizes: list[int], n: int) -> list[dict[str, Any]]:
    out = []
    for depth in range(1, len(sizes) + 1):
        tail = int(np.prod(sizes[depth:], dtype=np.int64)) if depth < len(sizes) else 1
        distinct = len(unique_sorted(sid_keys // tail))
        capacity = min(n, math.prod(sizes[:depth]))
        out.append({"depth": depth, "distinct": distinct,
                    "sparsity": distinct / capacity if capacity else 0.0})
    return out


def semantic_cohesion(q_counts: np.ndarray, q_sums: np.ndarray) -> float | None:
    multi = q_counts >= 2
    if not multi.any():
        return None
    n = q_counts[multi].astype(np.float64)
    sq = (q_sums[multi] ** 2).sum(axis=1)
    return float(((sq - n) / (n * (n - 1))).mean())


def preference_discrimination(q_sums: np.ndarray, *, t: float, max_clusters: int,
                              seed: int) -> float | None:
    norms = np.linalg.norm(q_sums, axis=1)
    keep = np.flatnonzero(norms > 0)
    if len(keep) < 2:
        return None
    if len(keep) > max_clusters:  # seeded subset over keys sorted ascending: deterministic
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_clusters, replace=False))
    u = q_sums[keep] / norms[keep, None]
    m = len(u)
    total = _pair_exp_sum(u, t, shift=0.0)
    if total == 0.0:  # every term under float64's range (a large t): summed shifted by the
        # largest exponent, which is then added back to the log
        shift = _largest_pair_exponent(u, t)
        return float(shift + math.log(_pair_exp_sum(u, t, shift=shift) / (m * (m - 1) / 2)))
    return float(math.log(total / (m * (m - 1) / 2)))


def _pair_blocks(u: np.ndarray, t: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """-t (1 - cos) of the pairs above the diagonal, a block of rows at a time: the block
    of rows start.. and the columns from start on (where those pairs lie), with the mask of
    the pairs in it; one block, not four temporaries (at most 32 MiB at 4,096 clusters),
    half the products of whole rows."""
    for start in range(0, len(u), 1024):
        sim = u[start:start + 1024] @ u[start:].T
        sim -= 1.0
        sim *= t
        yield sim, np.arange(sim.shape[1])[None, :] > np.arange(len(sim))[:, None]


def _pair_exp_sum(u: np.ndarray, t: float, *, shift: float) -> float:
    """The sum over pairs of exp(-t (1 - cos) - shift), in place in each block (the same
    values as the formula written out)."""
    total = 0.0
    for sim, upper in _pair_blocks(u, t):
        sim -= shift
        with np.errstate(over="ignore"):  # (shifted, a term outside the mask may overflow)
            np.exp(sim, out=sim)
        total += float(sim[upper].sum())
    return total


def _largest_pair_exponent(u: np.ndarray, t: float) -> float:
    return max(float(sim[upper].max()) for sim, upper in _pair_blocks(u, t) if upper.any())


def _final_sids(p: Partial, sizes: list[int], decision: PruneDecision):
    """The distinct full SIDs with their items, pruned: (codes, kept, final keys, counts)."""
    codes = codes_of_keys(p.sid_keys, sizes)
    kept = kept_layers(codes, decision)
    return codes, kept, final_keys(codes, kept, tuple(sizes)), p.sid_counts


def final_sid_counts(p: Partial, sizes: list[int], decision: PruneDecision) -> tuple[
        np.ndarray, np.ndarray]:
    """(final SID keys, items per final SID), sorted by key."""
    _, _, fk, counts = _final_sids(p, sizes, decision)
    uniq, inv = np.unique(fk, return_inverse=True)
    return uniq, np.bincount(inv, weights=counts).astype(np.int64)


def pruning_stats(p: Partial, sizes: list[int], decision: PruneDecision,
                  layers_before: list[dict[str, Any]]) -> dict[str, Any]:
    codes, kept, _, counts = _final_sids(p, sizes, decision)
    after = layer_counts_after(codes, counts, kept, tuple(sizes))
    lengths = kept.sum(axis=1)
    n = max(p.n, 1)
    return {
        "strategy": decision.strategy, "layer": decision.layer if decision.strategy in (
            "drop_layer", "top_k", "mass") else None,
        "pruned_tokens": decision.pruned_tokens,
        "items_pruned": int(counts[lengths < len(sizes)].sum()),
        "mean_sid_length": float((lengths * counts).sum() / n),
        "layers_before": layers_before,
        "layers_after": [{"layer": i, **layer_stats(c)} for i, c in enumerate(after)],
    }


def _shared(keys: np.ndarray, table_keys: np.ndarray, table_counts: np.ndarray) -> np.ndarray:
    """The whole table's items of each of a subset's SIDs `keys` (both sorted key arrays)."""
    at = np.searchsorted(table_keys, keys)
    if len(keys) and (at.max() >= len(table_keys) or (table_keys[at] != keys).any()):
        raise ValueError("a subset's SIDs are not all SIDs of its table")
    return table_counts[at]


def finalize_metrics(p: Partial, sizes: list[int], *, quality_depth: int, pd_t: float = 2.0,
                     pd_max_clusters: int = 4096, seed: int = 0,
                     decision: PruneDecision | None = None,
                     table: Partial | None = None) -> dict[str, Any]:
    """metrics.json sections: layers, prefixes, conditional, hourglass, collisions (of the final,
    pruned SIDs; collisions_before of the full codes), reconstruction, quality, pruning.
    table: the whole table's statistics when `p` is a subset of its items (head / tail): the
    subset's collisions are then with any item of the table."""
    n = p.n
    decision = decision or PruneDecision("none", tuple(sizes))
    layers = [{"layer": i, **layer_stats(c)} for i, c in enumerate(p.layer_counts)]
    final, final_counts = final_sid_counts(p, sizes, decision)
    if table is None:
        collisions = collision_stats(final_counts, n)
        before = collision_stats(p.sid_counts, n)
    else:
        collisions = collision_stats(_shared(final, *final_sid_counts(table, sizes, decision)),
                                     n, held=final_counts)
        before = collision_stats(_shared(p.sid_keys, table.sid_keys, table.sid_counts), n,
                                 held=p.sid_counts)
    return {
        "layers": layers,
        "prefixes": prefix_stats(p.sid_keys, list(sizes), n),
        "conditional": conditional_stats(p.trans_keys, p.trans_counts, list(sizes)),
        "hourglass": hourglass_verdict(layers),
        "collisions": collisions,
        "collisions_before": before,
        "reconstruction": {
            "mse": float(p.sq_res_sum[-1] / n) if n else 0.0,
            "relative_error": float(p.sq_res_sum[-1] / p.x_sq_sum) if p.x_sq_sum else 0.0,
            "residual_norm_by_layer": [float(v / n) if n else 0.0 for v in p.res_norm_sum],
            "residual_sq_norm_by_layer": [float(v / n) if n else 0.0 for v in p.sq_res_sum],
        },
        "quality": {
            "depth": quality_depth,
            "clusters": int(len(p.q_keys)),
            "semantic_cohesion": semantic_cohesion(p.q_counts, p.q_sums),
            "preference_discrimination": preference_discrimination(
                p.q_sums, t=pd_t, max_clusters=pd_max_clusters, seed=seed),
        },
        "pruning": pruning_stats(p, sizes, decision, layers),
    }


BARELY_LEARNED = 0.9  # a learned quantizer's relative error from which it is said
FEW_CODES = 0.1  # a share of the codes a layer could use, under which it is said


def quality_warnings(metrics: dict[str, Any], items: int, *, learned: bool,
                     reused: bool = False) -> list[str]:
    """What the build's log warns of in its figures: the codebooks hardly coding the items,
    a layer using under `FEW_CODES` of the codes it could (its size, or the items where
    fewer; from 10 on): its codebook collapsed; and a `learned` quantizer whose relative error
    is `BARELY_LEARNED` or more (zero vectors give 1.0: too few optimizer steps, or a
    learning rate too low); and a head holding every item (ties at its threshold).
    `reused`: the codebooks are a version's (encode.from_version), which only a new fit
    changes."""
    refit = "refit the codebooks (a build without encode.from_version)"
    fix = (refit if reused else "use a lower quantizer.lr, or a smaller layer" if learned
           else "use a smaller layer")
    out = [f"layer {i} uses {layer['used']} of its {layer['size']} codes for {items} items: "
           f"its codebook collapsed, or the items hold fewer distinct values there ({fix})"
           for i, layer in enumerate(metrics["layers"])
           if min(layer["size"], items) >= 10
           and layer["used"] < FEW_CODES * min(layer["size"], items)]
    if metrics.get("tail", {}).get("items") == 0 and metrics.get("head", {}).get("items"):
        out.append(f"the head holds all {items} items and the tail none: every item's "
                   "popularity is at or above the head's threshold (the items tied at it join "
                   "the head), so the head / tail figures compare nothing; a lower "
                   "metrics.head_share, or finer popularity values, split them")
    rel = metrics["reconstruction"]["relative_error"]
    if learned and rel >= BARELY_LEARNED:
        train = ("train it longer (quantizer.epochs, a smaller quantizer.batch_size) or with "
                 "a higher quantizer.lr")
        out.append(f"relative error {rel:.3f}: the learned quantizer reconstructs the items "
                   f"hardly better than zero vectors would (1.0); "
                   f"{f'{refit}: {train}' if reused else train}")
    return out
