"""Hourglass diagnostics (papers 000/001): how items route from one layer to the next.

From the (parent token at l-1, token at l) pair counts of a `Partial`:
- conditional concentration: for each parent, the entropy and top share of its items over
  layer-l tokens; summarised item-weighted (the weighted mean entropy is H(layer l | l-1));
- routing nodes: the in-degree of each layer-l token (how many parents route into it);
  a few tokens with huge in-degree and item share are the hourglass "neck";
- a one-line verdict: a middle layer markedly more concentrated than its neighbours.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

GINI_MARGIN = 0.1  # middle-layer Gini above both neighbours by this much = hourglass


def transition_stats(keys: np.ndarray, counts: np.ndarray, k_parent: int, k_child: int,
                     *, top: int = 10) -> dict[str, Any]:
    """keys: parent * k_child + child (int64), counts: items per pair."""
    parent, child = keys // k_child, keys % k_child
    c = counts.astype(np.float64)
    n = c.sum()
    per_parent = np.bincount(parent, weights=c, minlength=k_parent)
    p = c / per_parent[parent]
    ent_terms = np.bincount(parent, weights=-p * np.log(p), minlength=k_parent)
    top_child = np.zeros(k_parent)
    np.maximum.at(top_child, parent, c)
    used = per_parent > 0
    w = per_parent[used] / n if n else per_parent[used]
    in_degree = np.bincount(child, minlength=k_child)
    items_in = np.bincount(child, weights=c, minlength=k_child)
    order = np.lexsort((np.arange(k_child), -items_in, -in_degree))[:top]
    return {
        "conditional_entropy": float((w * ent_terms[used]).sum()),
        "conditional_entropy_norm": float((w * ent_terms[used]).sum() / math.log(k_child)),
        "mean_top_share": float((w * top_child[used] / per_parent[used]).sum()),
        "mean_children_per_parent": float(np.bincount(parent, minlength=k_parent)[used].mean())
        if used.any() else 0.0,
        "in_degree": {
            "max": int(in_degree.max()) if len(in_degree) else 0,
            "mean_over_used": float(in_degree[in_degree > 0].mean()) if (in_degree > 0).any()
            else 0.0,
            "top": [{"token": int(t), "in_degree": int(in_degree[t]),
                     "items": int(items_in[t]), "share": float(items_in[t] / n) if n else 0.0}
                    for t in order if in_degree[t] > 0],
        },
    }


def conditional_stats(trans_keys: list[np.ndarray], trans_counts: list[np.ndarray],
                      sizes: list[int]) -> list[dict[str, Any]]:
    return [{"from_layer": i - 1, "to_layer": i,
             **transition_stats(trans_keys[i - 1], trans_counts[i - 1], sizes[i - 1], sizes[i])}
            for i in range(1, len(sizes))]


def hourglass_verdict(layers: list[dict[str, Any]], margin: float = GINI_MARGIN) -> dict[str, Any]:
    """Is some middle layer markedly more concentrated (Gini) than the layers around it?"""
    gini = [layer["gini"] for layer in layers]
    worst, excess = None, 0.0
    for i in range(1, len(gini) - 1):
        gap = gini[i] - max(gini[i - 1], gini[i + 1])
        if gap > excess:
            worst, excess = i, gap
    numbers = ", ".join(f"L{i} gini {g:.3f} H_norm {layer['entropy_norm']:.3f} "
                        f"top {layer['top_share']:.3f}" for i, (g, layer) in
                        enumerate(zip(gini, layers)))
    if worst is not None and excess > margin:
        text = (f"hourglass at layer {worst}: its Gini exceeds both neighbours by "
                f"{excess:.3f} ({numbers}); consider prune.strategy=top_k/mass or drop_layer")
    else:
        text = (f"no hourglass (no middle layer's Gini exceeds its neighbours by {margin}): "
                f"{numbers}")
    return {"detected": worst is not None and excess > margin, "layer": worst,
            "excess_gini": excess, "verdict": text}
