"""The head / tail popularity threshold: exact, whatever the grouping of the rows, on the
driver or in engine passes over value ranges."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest

from semid_dist.codes.headsplit import (
    MAX_ROWS,
    SHIFTS,
    ValueRanges,
    find_threshold,
    head_threshold,
    merge_ranges,
    value_ranges,
)
from semid_dist.errors import InputError
from semid_dist.io.catalog import CatalogPlan, Piece, Shard
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from semid_dist.popularity import check_popularity, scan_popularity
from tests.conftest import clustered, small_config, write_catalog

SHARES = (0.0, 0.3, 0.8, 0.999, 1.0)


def exact_threshold(pop: np.ndarray, share: float) -> float:
    """The definition, in rational arithmetic: the value of the item at which the running
    sum from the most popular item down first reaches share x total."""
    desc = sorted((Fraction(float(v)) for v in pop), reverse=True)
    total = sum(desc)
    if total == 0:
        return float("inf")
    run = Fraction(0)
    for v in desc:
        run += v
        if run >= Fraction(share) * total:
            return float(v)
    raise AssertionError("the running sum never reached the share")


def columns() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.pareto(1.2, 997),                                   # long-tailed floats
            rng.integers(0, 20, 500).astype(np.float64),            # counts with many ties
            rng.random(1000) * 1e6,
            np.where(rng.random(800) < 0.9, 0.0, rng.lognormal(0, 3, 800)),  # mostly zero
            1.0 + np.arange(300) * np.finfo(np.float64).eps,        # one ulp apart
            np.array([-0.0, 0.0, 5e-324, 1e-310, 2.2e-308, 1.0, 3e5, 1e300]),  # subnormals
            np.full(10, 3.0), np.array([7.0]), np.zeros(4)]


def test_threshold_is_the_exact_running_sum_threshold():
    for pop in columns():
        for share in SHARES:
            assert head_threshold(pop, share) == exact_threshold(pop, share), (pop[:4], share)
    assert head_threshold(np.zeros(5), 0.8) == float("inf")


def test_head_holds_the_share_and_is_minimal():
    rng = np.random.default_rng(6)
    pop = np.floor(rng.pareto(1.2, 1000) * 10)
    for share in (0.5, 0.8, 0.95):
        t = head_threshold(pop, share)
        assert pop[pop >= t].sum() >= share * pop.sum()
        assert pop[pop > t].sum() < share * pop.sum()  # without the threshold's ties: short


def test_any_grouping_and_order_of_the_rows_gives_the_same_histograms_and_threshold():
    rng = np.random.default_rng(3)
    for pop in columns():
        whole = value_ranges(pop)
        for _ in range(4):
            cuts = np.sort(rng.integers(0, len(pop) + 1, rng.integers(0, 6)))
            parts = np.split(rng.permutation(pop), cuts)  # empty parts too
            merged = merge_ranges([value_ranges(p) for p in reversed(parts)])
            for name in ("keys", "count", "hi", "lo", "low", "high"):
                assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
            for share in SHARES:
                assert head_threshold(parts, share) == head_threshold(pop, share)


def test_each_pass_narrows_to_one_range_and_stops_at_a_single_value():
    """Values one ulp apart share a range down to the last level: three passes deeper.
    Small integer counts are single values already in the first ranges: none."""
    def passes(pop: np.ndarray, share: float) -> tuple[float, list[int]]:
        levels: list[int] = []

        def refine(level: int, prefix: int):
            levels.append(level)
            return value_ranges(pop, level=level, prefix=prefix)

        return find_threshold(value_ranges(pop), share, refine), levels

    close = 1.0 + np.arange(300) * np.finfo(np.float64).eps
    assert passes(close, 0.5) == (exact_threshold(close, 0.5), list(range(1, len(SHIFTS))))
    counts = np.arange(100, dtype=np.float64) % 17  # 4..7 share a binary exponent
    assert passes(counts, 0.8) == (exact_threshold(counts, 0.8), [1])
    powers = 2.0 ** (np.arange(100) % 9)  # one value per binary exponent
    assert passes(powers, 0.8) == (exact_threshold(powers, 0.8), [])
    with pytest.raises(ValueError, match="missed rows"):  # a pass that lost the range's rows
        find_threshold(value_ranges(close), 0.5,
                       lambda level, prefix: value_ranges(close[:0], level=level))
    with pytest.raises(ValueError, match="need one level"):
        merge_ranges([value_ranges(close), value_ranges(close, level=1, prefix=0)])


def test_bad_arguments_and_edges_are_clear():
    pop = np.arange(10, dtype=np.float64)
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"share=.* must be in \[0, 1\]"):
            head_threshold(pop, share)
    assert head_threshold([], 0.8) == float("inf")  # no values: no head
    assert head_threshold([pop[:0], pop[:0]], 0.8) == float("inf")
    one = value_ranges(pop[1:2])
    big = ValueRanges(level=0, low=one.low, high=one.high, count=one.count + MAX_ROWS // 2,
                      hi=one.hi, lo=one.lo)
    merged = merge_ranges([big, one])  # under 2^36 values: exact int64 sums
    assert merged.count.tolist() == [int(big.count[0]) + int(one.count[0])]
    assert merged.hi.tolist() == [2 * int(one.hi[0])] and merged.lo.tolist() == [2 * int(one.lo[0])]
    with pytest.raises(ValueError, match="would overflow"):
        merge_ranges([big, big])


def test_popularity_check_counts_every_bad_value_and_names_the_first():
    """The first bad value is named by its file and row there, also inside a shard of
    several files (the second: 2 rows of part-1, then a small file's 8)."""
    shards = (Shard(0, (Piece("/cat/part-0.parquet", (0,), 0, 10),)),
              Shard(1, (Piece("/cat/part-1.parquet", (1,), 100, 2),
                        Piece("/cat/small.parquet", (0, 1), 0, 8))),
              Shard(2, (Piece("/cat/part-2.parquet", (0,), 200, 10),)))
    plan = CatalogPlan("/cat", shards, pa.schema([("pop", pa.float64())]), "fp")
    pop = np.arange(30, dtype=np.float64)
    per_shard = [(i, pop[10 * i:10 * i + 10]) for i in range(3)]
    check_popularity([scan_popularity(per_shard)], plan, "pop")  # all valid: nothing raised
    pop[[13, 14, 22, 29]] = [np.nan, -1.0, np.inf, -np.inf]
    want = r"holds 4 NaN, infinite or negative values \(e\.g\. nan at /cat/small\.parquet:1\)"
    for scans in ([scan_popularity(per_shard)],                       # one group
                  [scan_popularity([p]) for p in reversed(per_shard)],  # a scan per shard
                  [scan_popularity(per_shard[2:]), scan_popularity(per_shard[:2])]):
        assert all(s.ranges is None for s in scans if s.bad)
        with pytest.raises(InputError, match=want):
            check_popularity(scans, plan, "pop")


def test_engine_passes_give_the_drivers_threshold_and_the_same_acrq_sids(tmp_path):
    """Past driver.gather_rows the scan sends only value-range histograms and the engine
    makes the passes deeper: the same threshold as the driver's, so the same ACRQ fit, SIDs
    and head / tail figures."""
    x = clustered(1200, 8, seed=4)
    # continuous, so passes deeper; ascending through the files, so only the groups that
    # hold the range being narrowed get a task
    pop = np.sort(np.random.default_rng(4).lognormal(0, 2, len(x)))
    catalog = write_catalog(tmp_path / "cat", x, files=3, popularity=pop)
    opts = {"quantizer__method": "acrq", "quantizer__layers": [16, 8],
            "quantizer__anchor_layers": [4, 4], "input__popularity_column": "popularity",
            "fit__sample_size": 1200}
    logs: list[str] = []
    results, tables = [], []
    for gather in (10**6, 250):
        root = str(tmp_path / f"out-{gather}")
        results.append(build(small_config(catalog, root, driver__gather_rows=gather, **opts),
                             log=logs.append))
        tables.append(TableStore(root, "sids").read_data().sort_by("item_id"))
    assert any("ids for duplicates in" in m for m in logs)  # the second build was bucketed
    passes = [m for m in logs if "more pass(es) over the popularity column" in m]
    assert len(passes) == 1
    count, tasks = map(int, re.search(r"took (\d+) more pass\(es\).*\((\d+) tasks?\)",
                                      passes[0]).groups())
    groups = 3  # one shard of 400 rows each (gather_rows 250)
    assert count >= 1 and count <= tasks < count * groups
    assert tables[0].equals(tables[1])
    head = int((pop >= head_threshold(pop, 0.8)).sum())
    for res in results:
        assert res.metrics["head"]["items"] == head
        assert res.metrics["head"]["items"] + res.metrics["tail"]["items"] == len(x)
    assert results[0].metrics["head"] == results[1].metrics["head"]
