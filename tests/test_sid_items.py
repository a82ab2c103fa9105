"""The SID -> items lookup's grouping: one int64 key per SID (`sid_keys`), the rows back
from keys (`key_rows`), and a bucket's SIDs with their items in suffix order (`sid_groups`),
against padded rows and a brute-force grouping in Python."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.codes.drift import padded_lists
from semid_dist.errors import StoreError
from semid_dist.sid_items import (
    _key_buckets,
    _keyed,
    _sid_buckets,
    key_radix,
    key_rows,
    sid_groups,
    sid_items_split,
    sid_keys,
)
from semid_dist.stages import JobContext


def _random_sids(rng: np.random.Generator, n: int, width: int, high: int) -> list:
    """n SIDs of 0..width tokens below `high`, some of them null, many repeated."""
    pool = [None, []] + [rng.integers(0, high, rng.integers(1, width + 1)).tolist()
                         for _ in range(max(n // 4, 1))]
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def test_one_key_per_sid_orders_and_decodes_as_padded_rows():
    rng = np.random.default_rng(3)
    sids = _random_sids(rng, 3000, 3, 40)
    whole = pa.array(sids, pa.list_(pa.int64()))
    # a plain array, a slice of one (its offsets do not start at 0) and a chunked column
    for col in (whole, whole.slice(700, 1500),
                pa.chunked_array([whole.slice(0, 1000), whole.slice(1000)])):
        rows = padded_lists(col, 3)
        keys, radix = sid_keys(col, 3)
        assert keys.dtype == np.int64 and radix == 41  # the largest token + 2
        np.testing.assert_array_equal(key_rows(keys, radix, 3), rows)
        # keys sort as the padded rows do (-1 below every token), ties in row order
        np.testing.assert_array_equal(np.argsort(keys, kind="stable"),
                                      np.lexsort(rows.T[::-1]))
        # equal keys exactly where the rows are equal
        _, key_groups = np.unique(keys, return_inverse=True)
        _, row_groups = np.unique(rows, axis=0, return_inverse=True)
        np.testing.assert_array_equal(key_groups, row_groups.ravel())


@pytest.mark.parametrize("col, width", [
    (pa.array([[1, 2, 3], [2**21]], pa.list_(pa.int64())), 3),  # (2^21 + 2)^3 >= 2^62
    (pa.array([[1, -2]], pa.list_(pa.int64())), 3),  # a negative token
    (pa.array([[1, 2, 3, 4]], pa.list_(pa.int64())), 3),  # longer than the width
    (pa.array([[1, None]], pa.list_(pa.int64())), 3),  # a null token
    (pa.array([[1, 2, 3]], pa.list_(pa.int64(), 3)), 3),  # a fixed-size list
    (pa.array([[1.0, 2.0]], pa.list_(pa.float64())), 3),  # not integers
])
def test_sids_without_one_key_are_declined(col, width):
    assert sid_keys(col, width) is None


@pytest.mark.parametrize("list_type", [pa.large_list(pa.int64()), pa.list_(pa.uint8()),
                                       pa.list_(pa.int32())])
def test_other_list_and_token_types_give_the_same_keys(list_type):
    """large_list offsets, and tokens at the top of a narrow type (255 in uint8: + 1 must not
    wrap to the padding's 0), key and decode as int64 lists do."""
    high = 255 if list_type.value_type == pa.uint8() else 2**20
    sids = [[high], [], None, [high, 0], [0, high], [high, high, high], [3]] * 5
    col = pa.array(sids, list_type)
    keys, radix = sid_keys(col, 3)
    want_keys, want_radix = sid_keys(pa.array(sids, pa.list_(pa.int64())), 3)
    assert radix == want_radix == high + 2
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_array_equal(key_rows(keys, radix, 3), padded_lists(col, 3))
    assert len(np.unique(keys)) == 6  # the null list is the empty one


def _brute_force(sids: list, suffix: list, width: int):
    groups: dict[tuple, list] = {}
    for row, (sid, s) in enumerate(zip(sids, suffix)):
        key = tuple((sid or []) + [-1] * (width - len(sid or [])))
        groups.setdefault(key, []).append((s, row))
    keys = sorted(groups)
    return (np.array(keys, dtype=np.int64).reshape(len(keys), width),
            [len(groups[k]) for k in keys],
            [row for k in keys for _, row in sorted(groups[k])])


@pytest.mark.parametrize("high", [50, 2**40])  # one key per SID; padded rows (too wide)
def test_a_bucket_groups_its_sids_with_their_items_in_suffix_order(high):
    rng = np.random.default_rng(5)
    sids = _random_sids(rng, 2000, 3, high)
    suffix = rng.integers(0, 4, len(sids)).tolist()  # ties too: then row order
    rows = pa.table({"sid_tokens": pa.array(sids, pa.list_(pa.int64())),
                     "suffix": pa.array(suffix, pa.int64())})
    assert (sid_keys(rows.column("sid_tokens"), 3) is None) == (high > 2**20)
    uniq, counts, order = sid_groups(rows, 3)
    want_uniq, want_counts, want_order = _brute_force(sids, suffix, 3)
    np.testing.assert_array_equal(uniq, want_uniq)
    assert counts.tolist() == want_counts
    assert order.tolist() == want_order


def test_a_given_radix_declines_tokens_not_below_it():
    col = pa.array([[3, 7], [8]], pa.list_(pa.int64()))
    keys, radix = sid_keys(col, 2, radix=12)  # tokens + 1 up to 9: below 12
    assert radix == 12 and keys.tolist() == [4 * 12 + 8, 9 * 12]
    assert sid_keys(col, 2, radix=10) is not None
    assert sid_keys(col, 2, radix=9) is None  # 8 + 1 is not below 9
    assert key_radix((256, 256, 256)) == 769  # global tokens: offset of the layer + code
    assert key_radix((2**21,) * 3) is None


def test_a_damaged_data_part_is_named_when_split(tmp_path):
    """A data part whose sid_tokens are not codes of the version's layers (here 9 with
    layers of 4 and 4, so tokens lie below 8) fails its split with the part named."""
    root = str(tmp_path)
    ctx = JobContext(catalog_url="unused", id_column="item_id", embedding_column="e",
                     popularity_column=None, dim=2, sizes=(4, 4), root=root, table="t",
                     version_id="v", quality_depth=1)
    part = tmp_path / "part.parquet"
    pq.write_table(pa.table({"item_id": [1, 2], "sid_tokens": [[0, 4], [1, 9]],
                             "suffix": [0, 0]}), part)
    with pytest.raises(StoreError, match=r"part\.parquet.*not codes of layers of sizes "
                                         r"\[4, 4\].*holding it is damaged"):
        sid_items_split(ctx, [str(part)], 2, str(tmp_path / "split"))
    assert not (tmp_path / "split").exists()


def test_split_keys_route_and_group_as_the_token_lists_do():
    """A split file's rows (item_id, sid_key, suffix) go to the same hash bucket as their
    token lists, and a bucket groups them into the same SIDs, counts and order; keys need
    the radix they were made in."""
    rng = np.random.default_rng(11)
    sizes = (8, 4, 4)
    sids = [None if s is None else [t + off for t, off in zip(s, (0, 8, 12))]
            for s in _random_sids(rng, 1500, 3, 4)]  # global tokens, some short or null
    lists = pa.table({"item_id": np.arange(len(sids)),
                      "sid_tokens": pa.array(sids, pa.list_(pa.int64())),
                      "suffix": pa.array(rng.integers(0, 3, len(sids)), pa.int32())})
    radix = key_radix(sizes)
    keyed = _keyed(lists, "part", sizes, radix)
    assert keyed.column_names == ["item_id", "sid_key", "suffix"]
    np.testing.assert_array_equal(_key_buckets(keyed, 7, width=3, radix=radix),
                                  _sid_buckets(lists, 7, width=3))
    for got, want in zip(sid_groups(keyed, 3, radix=radix), sid_groups(lists, 3)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="radix"):
        sid_groups(keyed, 3)


def test_an_empty_bucket_types_its_items_as_the_tables_ids(tmp_path):
    """A hash bucket holding no SID (few SIDs, many buckets) writes an empty part whose
    items are of the table's item id type (it wrote int64 whatever the ids), so the parts
    read back as one table."""
    from semid_dist.engines.local import LocalEngine
    from semid_dist.io.store import FileEntry, TableStore
    from semid_dist.pipeline import build
    from semid_dist.sid_items import sid_items_lookup
    from tests.conftest import clustered, small_config, write_catalog

    ids = np.array([f"sku-{i:03d}" for i in range(80)])
    catalog = write_catalog(tmp_path / "catalog", clustered(80, 8, seed=4), ids=ids)
    root = str(tmp_path / "out")
    cfg = small_config(catalog, root, quantizer__layers=[2, 2, 2])
    res = build(cfg, log=lambda m: None)
    store, vid = TableStore(root, "sids"), res.version_id
    ctx = JobContext(catalog_url=catalog, id_column="item_id", embedding_column="embedding",
                     popularity_column=None, dim=8, sizes=(2, 2, 2), root=root, table="sids",
                     version_id=vid, quality_depth=2)
    data = [FileEntry(**e) for e in res.manifest["files"] if e["path"].startswith("data/")]
    parts = [pq.read_table(store.entry_path(vid, e))
             for e in sid_items_lookup(LocalEngine(cfg), ctx, data, bucket_rows=4)]
    assert len(parts) == 20 and any(t.num_rows == 0 for t in parts)
    assert {t.schema.field("items").type.value_type for t in parts} == {pa.string()}
    whole = pa.concat_tables(parts)
    assert sorted(whole.column("items").combine_chunks().flatten().to_pylist()) == ids.tolist()
