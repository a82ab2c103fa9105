"""Deterministic collision suffixes: inside each identical SID, items are ranked by
reconstruction error, then item id; the rank is the suffix, so (sid, suffix) is unique."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.codes.keyset import unique_sorted


def needs_suffixes(keys: np.ndarray, counts: np.ndarray, held_keys: np.ndarray | None = None,
                   held_counts: np.ndarray | None = None) -> np.ndarray:
    """keys (m,) sorted int64 SID keys holding counts (m,) items -> (m,) bool: the SIDs
    whose items need suffixes ranked: those held by more than one item. With held_keys /
    held_counts (sorted, each key once; items among `counts` that keep the suffixes they
    have, the rows an incremental version carries), only those of them holding an item that
    is not held."""
    need = counts > 1
    if held_keys is None:
        return need
    pos = np.minimum(np.searchsorted(keys, held_keys), max(len(keys) - 1, 0))
    found = keys[pos] == held_keys if len(keys) else np.zeros(len(held_keys), bool)
    if (held_counts[~found] > 0).any():
        raise ValueError("held SIDs with items that the SID counts lack")
    held = np.zeros(len(keys), np.int64)
    held[pos[found]] = held_counts[found]
    return need & (counts > held)


def add_keys(keys: np.ndarray, counts: np.ndarray, more: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """SID keys (sorted, each once) holding counts items, with one item more of each key in
    `more` (any order, repeats counted) -> (keys, counts) alike."""
    merged, inv = np.unique(np.concatenate([keys, more]), return_inverse=True)
    out = np.bincount(inv[:len(keys)], weights=counts, minlength=len(merged))
    out += np.bincount(inv[len(keys):], minlength=len(merged))
    return merged, out.astype(np.int64)


def suffix_counts(suffix: np.ndarray) -> np.ndarray:
    """How many of the rows hold each non-zero collision suffix: (max + 1,) int64, index 0
    left 0 (the rows of suffix 0 are counted from the table's size, `sum_suffix_counts`)."""
    out = np.bincount(suffix[suffix > 0].astype(np.int64)).astype(np.int64)
    return out if len(out) else np.zeros(1, np.int64)


def sum_suffix_counts(counts: list[np.ndarray]) -> np.ndarray:
    """The sum of `suffix_counts` arrays of different lengths."""
    out = np.zeros(max((len(c) for c in counts), default=1), np.int64)
    for c in counts:
        out[:len(c)] += c
    return out


def key_range_bounds(keys: np.ndarray, counts: np.ndarray, ranges: int) -> np.ndarray:
    """keys: (m,) sorted int64 SID keys holding counts (m,) items -> (ranges - 1,) sorted
    bounds cutting them into `ranges` key ranges of about equal items: key k lies in range
    searchsorted(bounds, k, side="right"), so all of a SID's items share one range. A SID
    holding more than a range's share makes the ranges around it uneven (some may be
    empty)."""
    total = int(counts.sum())
    cum = np.cumsum(counts)
    # the first key of each range after the first: the first key past its share of items
    starts = np.searchsorted(cum, np.arange(1, ranges) * (total / ranges), side="right")
    return keys[np.minimum(starts, len(keys) - 1)]


def assign_suffixes(keys: np.ndarray, qerr: np.ndarray, item_ids: pa.Array) -> np.ndarray:
    """keys: (n,) int64 SID keys, qerr: (n,) float32, item_ids: n ids -> (n,) int32 suffixes,
    the rank of each item inside its key by (qerr, item_id)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int32)
    t = pa.table({"k": keys, "e": qerr, "i": item_ids})
    order = pc.sort_indices(t, sort_keys=[("k", "ascending"), ("e", "ascending"),
                                          ("i", "ascending")]).to_numpy()
    sorted_keys = keys[order]
    first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    suffix = np.empty(len(keys), dtype=np.int32)
    suffix[order] = np.arange(len(order)) - group_start
    return suffix


def free_suffixes(keys: np.ndarray, rank: np.ndarray, taken_keys: np.ndarray,
                  taken: np.ndarray) -> np.ndarray:
    """Suffixes for new items of SIDs that already hold items: the item of `rank` r inside
    its key gets the r-th smallest suffix no held item of that key has (taken_keys / taken:
    the held items' keys and suffixes). Keeps (sid, suffix) unique and fills gaps first."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int32)
    _, inv = np.unique(np.concatenate([keys, taken_keys]), return_inverse=True)
    group, held_group = inv[:len(keys)], inv[len(keys):]
    span = np.int64(max(int(taken.max(initial=0)), int(rank.max(initial=0))) + 2)
    held = unique_sorted(held_group.astype(np.int64) * span + taken.astype(np.int64))
    held_base = held - held % span
    first = np.searchsorted(held, held_base, side="left")  # each held suffix's key's first
    # free suffixes of the key below each held one: its suffix less the held ones before it
    # (non-decreasing inside a key, so the keyed array stays sorted)
    gaps = held_base + held % span - (np.arange(len(held)) - first)
    base = group.astype(np.int64) * span
    # the r-th free suffix is r plus the held ones below it: those with at most r free below
    below = (np.searchsorted(gaps, base + rank, side="right")
             - np.searchsorted(held, base, side="left"))
    return (rank + below).astype(np.int32)


def last_layer_prefix(final_keys: np.ndarray, last_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Split final SID keys (radix k_l + 1) into (prefix key, last-layer digit); a digit equal
    to `last_size` means the SID has no last-layer code."""
    return final_keys // (last_size + 1), final_keys % (last_size + 1)


def occupancy(final_keys: np.ndarray, final_counts: np.ndarray, prefixes: np.ndarray,
              last_size: int) -> np.ndarray:
    """(len(prefixes), last_size) items per last-layer code under each given prefix."""
    pre, digit = last_layer_prefix(final_keys, last_size)
    pos = np.searchsorted(prefixes, pre)
    hit = (pos < len(prefixes)) & (digit < last_size)
    hit[hit] &= prefixes[pos[hit]] == pre[hit]
    occ = np.zeros((len(prefixes), last_size), dtype=np.int64)
    np.add.at(occ, (pos[hit], digit[hit]), final_counts[hit])
    return occ


def reassign_overflow(prefix: np.ndarray, code: np.ndarray, qerr: np.ndarray,
                      item_ids: pa.Array, alt_codes: np.ndarray, alt_err: np.ndarray,
                      prefixes: np.ndarray, occ: np.ndarray, capacity: int,
                      held: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Capacity-bounded collisions for the rows of over-full SIDs (all rows of those SIDs).

    Inside each SID the first `capacity` items by (qerr, item_id) stay; each further item, in
    (prefix, code, qerr, item_id) order, moves to its best alternative last-layer code (in
    alt_codes order) whose SID under the same prefix still has room (the items before it
    in that order having moved). occ: (len(prefixes), k_last) items per code under each
    prefix before any moves. held: like
    occ, the items of each SID that are not among the rows and never move (the parent's rows
    in an incremental version); they take the first places. Returns (row indices that move,
    their new codes, their new qerr). Deterministic.
    """
    if len(prefix) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    t = pa.table({"p": prefix, "c": code, "e": qerr, "i": item_ids})
    order = pc.sort_indices(t, sort_keys=[("p", "ascending"), ("c", "ascending"),
                                          ("e", "ascending"), ("i", "ascending")]).to_numpy()
    grp = prefix[order] * (alt_codes.max(initial=0) + 2 + code.max(initial=0)) + code[order]
    first = np.r_[True, grp[1:] != grp[:-1]]
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    if held is not None:
        rank = rank + held[np.searchsorted(prefixes, prefix[order]), code[order]]
    movers = order[rank >= capacity]  # in the order they choose
    pidx = np.searchsorted(prefixes, prefix[movers])
    return _first_with_room(movers, pidx, code[movers], alt_codes[movers], alt_err[movers],
                            np.maximum(capacity - occ, 0))


def _first_with_room(movers: np.ndarray, pidx: np.ndarray, code: np.ndarray,
                     alt: np.ndarray, alt_err: np.ndarray, room: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each mover, in turn, takes its first alternative code (alt[:, 1:], in order) with room
    left under its prefix (room: (prefixes, k_last) free places). The codes the movers leave
    never get room (they hold more than the capacity until their overflow has left), so the
    places are fixed and this is deferred acceptance with one priority order for every code,
    which gives the same assignment as taking the movers one at a time: each round, every
    mover not yet placed points at its next code with room, and each code keeps the
    earliest movers up to its room; the others point further next round. -> (movers that
    move, their new codes, their new errors), in the movers' order."""
    m, width = alt.shape
    k = room.shape[1]
    cand = alt[:, 1:].astype(np.int64)
    ok = (cand >= 0) & (cand < k) & (cand != code[:, None])
    ok[ok] = room[np.broadcast_to(pidx[:, None], cand.shape)[ok], cand[ok]] > 0
    # nxt[:, j]: the first usable choice at or after j (width - 1: none left)
    nxt = np.where(ok, np.arange(width - 1), width - 1)
    nxt = np.minimum.accumulate(nxt[:, ::-1], axis=1)[:, ::-1]
    nxt = np.concatenate([nxt, np.full((m, 1), width - 1)], axis=1)
    ptr = nxt[:, 0].copy()
    while True:
        live = np.flatnonzero(ptr < width - 1)  # ascending: the movers' order
        target = pidx[live] * k + cand[live, ptr[live]]
        by = np.argsort(target, kind="stable")
        t = target[by]
        first = np.searchsorted(t, t, side="left")
        out = live[by][np.arange(len(t)) - first >= room.ravel()[t]]
        if len(out) == 0:
            break
        ptr[out] = nxt[out, ptr[out] + 1]
    moved = np.flatnonzero(ptr < width - 1)
    choice = ptr[moved]
    return (movers[moved].astype(np.int64), cand[moved, choice].astype(np.int32),
            alt_err[moved, choice + 1].astype(np.float32))
