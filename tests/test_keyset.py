"""codes/keyset: sorted key sets by sorting, against Python sets and sorted() of tuples."""

from __future__ import annotations

import numpy as np
import pytest

from semid_dist.codes.keyset import in_sorted, union_sorted, unique_rows, unique_sorted


@pytest.mark.parametrize("seed", range(5))
def test_unique_sorted_is_the_sorted_set(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-50, 50, rng.integers(0, 300))
    got = unique_sorted(x)
    assert got.tolist() == sorted(set(x.tolist()))
    assert got.dtype == x.dtype


@pytest.mark.parametrize("seed", range(5))
def test_union_sorted_is_the_sorted_union(seed):
    rng = np.random.default_rng(seed)
    a = np.array(sorted(set(rng.integers(0, 2**40, rng.integers(0, 200)).tolist())), np.int64)
    b = np.array(sorted(set(rng.integers(0, 2**40, rng.integers(0, 200)).tolist())
                        | set(a[::3].tolist())), np.int64)
    got = union_sorted(a, b)
    assert got.tolist() == sorted(set(a.tolist()) | set(b.tolist()))
    assert union_sorted(b, a).tolist() == got.tolist()


def _reference_rows(rows: np.ndarray) -> tuple[list[tuple], list[int]]:
    distinct = sorted(set(map(tuple, rows.tolist())))
    where = {r: i for i, r in enumerate(distinct)}
    return distinct, [where[tuple(r)] for r in rows.tolist()]


@pytest.mark.parametrize("seed", range(5))
def test_unique_rows_orders_rows_lexicographically(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    rows = rng.integers(-1, 6, (n, 3)).astype(np.int64)  # -1: a shorter SID's padding
    uniq, inverse = unique_rows(rows)
    distinct, index = _reference_rows(rows)
    assert list(map(tuple, uniq.tolist())) == distinct
    assert inverse.tolist() == index
    np.testing.assert_array_equal(uniq[inverse], rows)


def test_unique_rows_whose_key_would_overflow_int64_sorts_them_as_rows():
    """Eight columns spanning 2^40 each: no int64 key holds a row, so the rows are sorted
    column by column; the result is the same lexicographic order."""
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 2**40, (50, 8))
    rows[10:20] = rows[:10]  # repeated rows
    rows[25, 0] = rows[26, 0]  # rows that differ only in later columns
    uniq, inverse = unique_rows(rows)
    distinct, index = _reference_rows(rows)
    assert list(map(tuple, uniq.tolist())) == distinct
    assert inverse.tolist() == index


@pytest.mark.parametrize("rows", [
    np.array([[-1], [2**63 - 1], [0], [-1]], np.int64),  # a span past int64
    np.array([[2**64 - 1], [0], [3], [0]], np.uint64),
    np.array([[2**64 - 1, 5], [2**64 - 2, 1], [2**64 - 1, 5]], np.uint64),  # large, narrow
    np.array([[-128, 127], [127, -128], [-128, 127]], np.int8),
], ids=["int64-extremes", "uint64-extremes", "uint64-narrow", "int8-extremes"])
def test_unique_rows_at_the_ends_of_integer_ranges(rows):
    uniq, inverse = unique_rows(rows)
    distinct, index = _reference_rows(rows)
    assert list(map(tuple, uniq.tolist())) == distinct
    assert inverse.tolist() == index


def test_unique_rows_of_no_rows():
    uniq, inverse = unique_rows(np.zeros((0, 3), np.int64))
    assert uniq.shape == (0, 3) and inverse.shape == (0,)


def test_in_sorted_is_isin_for_sorted_keys():
    """Membership in ascending keys (distinct or not) by binary search equals np.isin, for
    values below, between, equal to and above the keys, and with no keys or no values."""
    rng = np.random.default_rng(3)
    for n, m, high in ((5000, 300, 1000), (65536, 20000, 256**3), (100, 1, 5), (0, 10, 9)):
        keys = np.sort(rng.integers(-2, high, m))
        x = rng.integers(-5, high + 5, n)
        x[: n // 3] = rng.choice(keys, n // 3)
        got = in_sorted(x, keys)
        assert got.dtype == bool
        np.testing.assert_array_equal(got, np.isin(x, keys))
    assert not in_sorted(np.arange(4), np.zeros(0, np.int64)).any()
