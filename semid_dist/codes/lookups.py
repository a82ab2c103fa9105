"""Lookup tables of a version, built from the distinct SIDs (never from per-item rows):

- vocabulary: every layer-scoped token (`offset[layer] + code`, named `<L{layer}_{code}>`)
  and the collision-suffix tokens (`<S{i}>`), with how many items use each, so a language
  model can add them;
- prefixes: every distinct prefix of the final token sequences with its item count and
  whether it is a complete SID (the trie for constrained decoding).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from semid_dist.codes.keyset import unique_rows
from semid_dist.codes.pruning import (
    PruneDecision,
    codes_of_keys,
    kept_layers,
    layer_counts_after,
    token_offsets,
)


def _token_rows(sid_keys: np.ndarray, sizes: tuple[int, ...], decision: PruneDecision):
    """(n_sids, L) token ids, -1 where the layer is pruned, packed to the left; lengths."""
    codes = codes_of_keys(sid_keys, sizes)
    kept = kept_layers(codes, decision)
    tokens = codes + token_offsets(sizes)[None, :]
    order = np.argsort(~kept, axis=1, kind="stable")  # kept layers first, in layer order
    packed = np.take_along_axis(np.where(kept, tokens, -1), order, axis=1)
    return packed, kept.sum(axis=1), codes, kept


def vocabulary_table(sid_keys: np.ndarray, sid_counts: np.ndarray, sizes: tuple[int, ...],
                     decision: PruneDecision, suffixes: np.ndarray) -> pa.Table:
    """Every token a SID of the table can hold: each layer's codes (with the items holding
    them after pruning) and the collision suffixes 0..max (`suffixes`: items holding each)."""
    _, _, codes, kept = _token_rows(sid_keys, sizes, decision)
    used = layer_counts_after(codes, sid_counts, kept, sizes)
    offsets = token_offsets(sizes)
    layer = np.repeat(np.arange(len(sizes)), sizes)
    code = np.concatenate([np.arange(s) for s in sizes])
    n_suffix = len(suffixes)
    return pa.table({
        "token_id": np.arange(sum(sizes) + n_suffix, dtype=np.int64),
        "kind": ["code"] * sum(sizes) + ["suffix"] * n_suffix,
        "layer": np.concatenate([layer, np.full(n_suffix, -1)]).astype(np.int16),
        "code": np.concatenate([code, np.arange(n_suffix)]).astype(np.int32),
        "token": [f"<L{a}_{b}>" for a, b in zip(layer, code)] + [f"<S{i}>" for i in
                                                                 range(n_suffix)],
        "items": np.concatenate([np.concatenate(used), suffixes]).astype(np.int64),
        "offset_of_layer": np.concatenate([offsets[layer], np.full(n_suffix, sum(sizes))]),
    })


def prefix_table(sid_keys: np.ndarray, sid_counts: np.ndarray, sizes: tuple[int, ...],
                 decision: PruneDecision) -> pa.Table:
    packed, lengths, _, _ = _token_rows(sid_keys, sizes, decision)
    depths, prefixes, items, complete = [], [], [], []
    for depth in range(1, len(sizes) + 1):
        rows = lengths >= depth
        if not rows.any():
            continue
        uniq, inv = unique_rows(packed[rows, :depth])
        items.append(np.bincount(inv, weights=sid_counts[rows]).astype(np.int64))
        complete.append(np.bincount(inv, weights=(lengths[rows] == depth)) > 0)
        prefixes.append(uniq)
        depths.append(np.full(len(uniq), depth, np.int8))
    flat = np.concatenate([p.ravel() for p in prefixes])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(depths).astype(np.int64))])
    return pa.table({
        "depth": np.concatenate(depths),
        "prefix_tokens": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                  pa.array(flat, pa.int64())),
        "items": np.concatenate(items),
        "complete": np.concatenate(complete),
    })


def token_counts_table(merged_layer_counts: list[np.ndarray], after: list[np.ndarray],
                       head: list[np.ndarray] | None = None,
                       tail: list[np.ndarray] | None = None) -> pa.Table:
    """Items per (layer, token) before and after pruning (+ head / tail when split)."""
    layer = np.concatenate([np.full(len(c), i) for i, c in enumerate(merged_layer_counts)])
    cols = {"layer": layer.astype(np.int16),
            "token": np.concatenate([np.arange(len(c)) for c in merged_layer_counts]),
            "items": np.concatenate(merged_layer_counts),
            "items_after_pruning": np.concatenate(after)}
    if head is not None and tail is not None:
        cols["items_head"] = np.concatenate(head)
        cols["items_tail"] = np.concatenate(tail)
    return pa.table(cols)


def flows_table(trans_keys: list[np.ndarray], trans_counts: list[np.ndarray],
                sizes: tuple[int, ...]) -> pa.Table:
    """Items routed from token `parent` at layer l-1 to token `child` at layer l (no rows
    for one layer)."""
    parts = [(np.full(len(k), i + 1), k // sizes[i + 1], k % sizes[i + 1], c)
             for i, (k, c) in enumerate(zip(trans_keys, trans_counts))]
    parts = parts or [(np.zeros(0, np.int16), *(np.zeros(0, np.int64),) * 3)]
    return pa.table({"to_layer": np.concatenate([p[0] for p in parts]).astype(np.int16),
                     "parent": np.concatenate([p[1] for p in parts]),
                     "child": np.concatenate([p[2] for p in parts]),
                     "items": np.concatenate([p[3] for p in parts])})


def sid_size_table(before: np.ndarray, after: np.ndarray) -> pa.Table:
    """Histogram: how many SIDs hold `items_per_sid` items, before and after pruning."""
    size = np.arange(1, max(before.max(initial=0), after.max(initial=0)) + 1)
    hb = np.bincount(before, minlength=len(size) + 1)[1:]
    ha = np.bincount(after, minlength=len(size) + 1)[1:]
    keep = (hb > 0) | (ha > 0)
    return pa.table({"items_per_sid": size[keep], "sids_before": hb[keep], "sids_after": ha[keep]})
