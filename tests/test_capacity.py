"""Capacity moves: placed all at once they are those of moving the items one at a time; the
statistics' change of capacity moves: applied to a build's statistics it gives those
of the moved codes computed from scratch, and the deltas of disjoint sets of moves (engine
tasks' prefix ranges) add up to the delta of all of them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from semid_dist.codes.capacity import apply_delta, merge_deltas, move_delta, prefix_ranges
from semid_dist.codes.collisions import last_layer_prefix, occupancy, reassign_overflow
from semid_dist.codes.drift import bucket_count
from semid_dist.codes.partials import partial_from_batch

SIZES = (6, 5, 7)


def moved_batch(seed: int) -> tuple[np.ndarray, ...]:
    """codes (n, 3), sq_residual (n, 3), x (n, 8); the rows that move, their new last codes
    and new last-layer squared residuals."""
    rng = np.random.default_rng(seed)
    n = 400
    codes = np.stack([rng.integers(0, k, n) for k in SIZES], axis=1).astype(np.int32)
    sq = rng.random((n, 3)).astype(np.float32)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    rows = np.sort(rng.choice(n, 90, replace=False))
    new_last = ((codes[rows, -1] + rng.integers(1, SIZES[-1], len(rows))) % SIZES[-1]
                ).astype(np.int32)
    new_sq = (sq[rows, -1] + rng.random(len(rows)).astype(np.float32))
    return codes, sq, x, rows, new_last, new_sq


def test_applied_delta_gives_the_statistics_of_the_moved_codes():
    codes, sq, x, rows, new_last, new_sq = moved_batch(1)
    before = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
    after_codes, after_sq = codes.copy(), sq.copy()
    after_codes[rows, -1], after_sq[rows, -1] = new_last, new_sq
    want = partial_from_batch(after_codes, after_sq, x, SIZES, quality_depth=2)
    delta = move_delta(codes[rows], new_last, sq[rows, -1], new_sq, SIZES)
    got = apply_delta(before, delta)
    assert delta.moved == len(rows) and got.n == want.n
    for a, b in zip(got.layer_counts, want.layer_counts):
        np.testing.assert_array_equal(a, b)
    for name in ("sid_keys", "sid_counts", "q_keys", "q_counts", "q_sums"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for a, b in zip(got.trans_keys + got.trans_counts, want.trans_keys + want.trans_counts):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got.sq_res_sum, want.sq_res_sum, rtol=1e-12)
    np.testing.assert_allclose(got.res_norm_sum, want.res_norm_sum, rtol=1e-12)
    assert apply_delta(before, move_delta(codes[:0], new_last[:0], new_sq[:0], new_sq[:0],
                                          SIZES)) is before  # no moves: unchanged


def test_deltas_of_disjoint_moves_add_up_to_the_delta_of_all():
    codes, sq, _, rows, new_last, new_sq = moved_batch(2)
    whole = move_delta(codes[rows], new_last, sq[rows, -1], new_sq, SIZES)
    cuts = [0, 13, 13, 50, len(rows)]  # an empty range too
    parts = [move_delta(codes[rows[a:b]], new_last[a:b], sq[rows[a:b], -1], new_sq[a:b], SIZES)
             for a, b in zip(cuts, cuts[1:])]
    merged = merge_deltas(parts)
    assert merged.moved == whole.moved == len(rows)
    for name in ("last_counts", "sid_keys", "sid_counts", "pair_keys", "pair_counts"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=name)
    assert merged.sq_res == pytest.approx(whole.sq_res, rel=1e-12)
    assert merged.res_norm == pytest.approx(whole.res_norm, rel=1e-12)
    assert (whole.sid_counts != 0).all() and whole.last_counts.sum() == 0


def test_prefix_ranges_hold_each_prefix_once_with_all_its_sids():
    """Every over-full prefix in exactly one range, the one its rows are routed to, and each
    range's key slice holds every SID under its prefixes (over-full or not), so a range task
    starts from the same occupancy as the driver's whole table."""
    rng = np.random.default_rng(5)
    last = 7
    for _ in range(40):
        keys = np.unique(rng.integers(0, 60 * (last + 1), rng.integers(1, 200)))
        counts = rng.integers(1, 30, len(keys)) * (rng.random(len(keys)) < 0.9) + 1
        over = counts > rng.integers(1, 20)
        if not over.any():
            continue
        bucket_rows = int(rng.integers(1, 200))
        ranges = prefix_ranges(keys, counts, over, last, bucket_rows=bucket_rows)
        prefix, _ = last_layer_prefix(keys, last)
        assert ranges.rows == int(counts[over].sum())
        assert ranges.count == bucket_count(ranges.rows, bucket_rows=bucket_rows)
        whole = occupancy(keys, counts, ranges.prefixes, last)
        seen = []
        for b in range(ranges.count):
            pe = slice(ranges.prefix_edges[b], ranges.prefix_edges[b + 1])
            ke = slice(ranges.key_edges[b], ranges.key_edges[b + 1])
            mine = ranges.prefixes[pe]
            routed = np.searchsorted(ranges.bounds, mine, side="right")
            assert (routed == b).all()
            inside = np.isin(prefix, mine)
            assert inside[ke].sum() == inside.sum()  # all their SIDs in the slice
            np.testing.assert_array_equal(occupancy(keys[ke], counts[ke], mine, last),
                                          whole[pe])
            seen.extend(mine.tolist())
        assert seen == sorted(set(prefix[over].tolist()))


def one_at_a_time(prefix, code, qerr, ids, alt, alt_err, prefixes, occ, capacity, held):
    """The capacity rule as written: the items past each SID's first `capacity` places (by
    qerr, id; held items first), in (prefix, code, qerr, id) order, each take in turn their
    first alternative code with fewer than `capacity` items under the same prefix."""
    occ = occ.copy()
    seen: dict[tuple[int, int], int] = {}
    moved, new_code, new_err = [], [], []
    for row in sorted(range(len(prefix)), key=lambda r: (prefix[r], code[r], qerr[r], ids[r])):
        p = int(np.searchsorted(prefixes, prefix[row]))
        place = seen.get((p, code[row]), 0) + (0 if held is None else held[p, code[row]])
        seen[(p, code[row])] = seen.get((p, code[row]), 0) + 1
        if place < capacity:
            continue
        for j in range(1, alt.shape[1]):
            target = int(alt[row, j])
            if target != code[row] and occ[p, target] < capacity:
                occ[p, target] += 1
                occ[p, code[row]] -= 1
                moved.append(row)
                new_code.append(target)
                new_err.append(alt_err[row, j])
                break
    return moved, new_code, new_err


@pytest.mark.parametrize("seed", range(40))
def test_capacity_moves_equal_taking_the_items_one_at_a_time(seed):
    """`reassign_overflow` places every mover at once (rounds of deferred acceptance); the
    moves, their order and their errors are those of moving the items one at a time, with
    and without held items, when codes run out of room and movers chain through codes."""
    rng = np.random.default_rng(seed)
    k, n, width = int(rng.integers(3, 9)), int(rng.integers(20, 400)), int(rng.integers(1, 6))
    capacity = int(rng.integers(1, 6))
    prefixes = np.sort(rng.choice(50, int(rng.integers(1, 5)), replace=False)).astype(np.int64)
    prefix = prefixes[rng.integers(0, len(prefixes), n)]
    code = np.minimum(rng.zipf(1.6, n) - 1, k - 1).astype(np.int32)  # a few crowded codes
    qerr = rng.integers(0, 5, n).astype(np.float32)  # ties: broken by id
    ids = rng.permutation(n).astype(np.int64)
    alt = np.concatenate([code[:, None], rng.integers(0, k, (n, width - 1))], axis=1
                         ).astype(np.int32)
    alt_err = np.sort(rng.random((n, width)), axis=1).astype(np.float32)
    held = (rng.integers(0, 3, (len(prefixes), k)) if seed % 2 else None)
    occ = np.zeros((len(prefixes), k), np.int64)
    np.add.at(occ, (np.searchsorted(prefixes, prefix), code), 1)
    if held is not None:
        occ += held
    # the rows of over-full SIDs only, as the reduce gives them
    keep = occ[np.searchsorted(prefixes, prefix), code] > capacity
    rows = (prefix[keep], code[keep], qerr[keep], ids[keep], alt[keep], alt_err[keep])
    got = reassign_overflow(*rows[:3], pa.array(rows[3]), *rows[4:], prefixes, occ,
                            capacity, held)
    want = one_at_a_time(*rows, prefixes, occ, capacity, held)
    assert got[0].tolist() == want[0]
    assert got[1].tolist() == want[1] and got[2].tolist() == want[2]
