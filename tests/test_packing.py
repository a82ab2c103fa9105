"""Array bundles (semid_dist.packing) and the staged shard results written with them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from semid_dist import packing
from semid_dist.codes.partials import partial_from_batch
from semid_dist.errors import SemidError
from semid_dist.io.store import STAGING, FileEntry, TableStore
from semid_dist.shard_results import (
    load_shard_results,
    load_shard_statistics,
    save_shard_result,
)


def test_bundle_round_trip_keeps_dtype_shape_and_values():
    rng = np.random.default_rng(3)
    arrays = {
        "f64": rng.normal(size=(7, 5)),
        "i32": rng.integers(-9, 9, size=(3, 2, 4)).astype(np.int32),
        "u8_odd": np.arange(13, dtype=np.uint8),  # a length that needs padding after it
        "scalar": np.asarray(2.5),
        "empty": np.zeros((0, 4), np.float32),
        "strided": rng.normal(size=(6, 6))[::2, 1::2],  # not contiguous
        "big_endian": np.arange(5, dtype=">i8"),
    }
    meta = {"index": 4, "note": "x", "nested": [1, None]}
    data = packing.pack(arrays, meta)
    assert packing.is_bundle(data)
    got_meta, got = packing.unpack(data)
    assert got_meta == meta
    assert list(got) == list(arrays)
    for name, arr in arrays.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr)
        assert got[name].flags.writeable, name
    for name, arr in got.items():  # every array starts 8-byte aligned in the copy
        if arr.size:
            assert arr.ctypes.data % 8 == 0, name


def test_bundle_arrays_are_independent_of_the_input_bytes():
    data = bytearray(packing.pack({"a": np.arange(4, dtype=np.int64)}))
    _, got = packing.unpack(data)
    got["a"][0] = 99
    data[-8:] = b"\xff" * 8
    assert got["a"].tolist() == [99, 1, 2, 3]
    assert packing.unpack(packing.pack({"a": np.arange(4)}))[1]["a"].tolist() == [0, 1, 2, 3]


def test_bundle_unpacked_without_copy_views_the_input():
    arrays = {"a": np.arange(4, dtype=np.int64), "b": np.linspace(0, 1, 6).reshape(2, 3)}
    data = packing.pack(arrays, {"k": 1})
    meta, got = packing.unpack(data, copy=False)
    assert meta == {"k": 1}
    for name, arr in arrays.items():
        np.testing.assert_array_equal(got[name], arr)
        assert not got[name].flags.writeable, name  # views of immutable bytes
    writable = bytearray(data)
    got = packing.unpack(writable, copy=False)[1]
    writable[-8:] = np.float64(7.0).tobytes()  # the last 8 bytes are b's last value
    assert got["b"][1, 2] == 7.0


def test_bundle_rejects_objects_and_bad_data():
    with pytest.raises(TypeError, match="dtype object"):
        packing.pack({"o": np.array([object()])})
    data = packing.pack({"a": np.arange(100, dtype=np.float64)})
    with pytest.raises(ValueError, match="not an array bundle"):
        packing.unpack(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="not an array bundle"):
        packing.unpack(data[:10])
    with pytest.raises(ValueError, match="array 'a' ends at byte 800"):
        packing.unpack(data[:-8])
    with pytest.raises(ValueError, match="header of"):
        packing.unpack(data[:30])


def _packed_partial(rng: np.random.Generator, n: int) -> bytes:
    """The packed statistics of n random items, 3 x 4 codes, d = 5."""
    codes = rng.integers(0, 4, size=(n, 3)).astype(np.int32)
    return partial_from_batch(codes, rng.random((n, 3), dtype=np.float32),
                              rng.standard_normal((n, 5)).astype(np.float32), (4, 4, 4),
                              quality_depth=2).pack()


def _result(index: int) -> dict:
    rng = np.random.default_rng(index)
    return {"index": index, "rows": 100 + index, "encoded": 98, "rejected": 2,
            "rejects_file": FileEntry(f"rejects/part-{index}.parquet", 2, 345, "ab" * 32),
            "reasons": json.dumps({"null embedding": 2}),
            "partial_head": _packed_partial(rng, 30), "partial_tail": _packed_partial(rng, 68)}


def _statistics(store: TableStore, index: int) -> dict[str, bytes]:
    """A shard's statistics as the driver reads them, packed again to compare bytes."""
    return {part: p.pack() for part, p in load_shard_statistics(store, "v1", index).items()}


def _counts(result: dict) -> dict:
    """A staged result as `load_shard_results` gives it: without the statistics."""
    return {k: v for k, v in result.items() if not k.startswith("partial")}


def test_staged_results_round_trip_on_a_real_filesystem(tmp_path):
    store = TableStore(str(tmp_path), "t")
    want = {i: _result(i) for i in (0, 3)}
    want[5] = {**_result(5), "rejects_file": None}
    del want[5]["partial_head"], want[5]["partial_tail"]
    want[5]["partial"] = _packed_partial(np.random.default_rng(5), 98)
    for result in want.values():
        save_shard_result(store, "v1", result)
    assert sorted(p.name for p in (tmp_path / "t/versions/v1" / STAGING).iterdir()) == [
        "result-000000.bin", "result-000003.bin", "result-000005.bin"]
    assert load_shard_results(store, "v1") == {i: _counts(r) for i, r in want.items()}
    assert load_shard_results(store, "v2") == {}
    for i in (0, 3):
        assert _statistics(store, i) == {"head": want[i]["partial_head"],
                                         "tail": want[i]["partial_tail"]}
    assert _statistics(store, 5) == {"all": want[5]["partial"]}
    assert load_shard_statistics(store, "v1", 5)["all"].n == 98


def test_staged_npz_result_of_an_earlier_run_is_still_read(tmp_path):
    """A run killed before results were bundles left npz files; resuming reads them."""
    store = TableStore(str(tmp_path), "t")
    old = _result(7)
    meta = {k: v for k, v in old.items() if not k.startswith("partial")}
    meta["rejects_file"] = vars(old["rejects_file"])
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             partial_head=np.frombuffer(old["partial_head"], np.uint8),
             partial_tail=np.frombuffer(old["partial_tail"], np.uint8))
    store.write_file("v1", f"{STAGING}/result-000007.npz", buf.getvalue())
    save_shard_result(store, "v1", _result(8))
    assert load_shard_results(store, "v1") == {7: _counts(old), 8: _counts(_result(8))}
    assert _statistics(store, 7) == {"head": old["partial_head"], "tail": old["partial_tail"]}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_staged_result_counts_as_not_finished(tmp_path, damage):
    """A resumed run encodes the shard of a damaged result file again, keeping the others."""
    store = TableStore(str(tmp_path), "t")
    for i in (1, 2):
        save_shard_result(store, "v1", _result(i))
    path = tmp_path / "t/versions/v1" / STAGING / "result-000002.bin"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-40], "garbage": b"PK\x03\x04" + data[4:200],
                      "empty": b""}[damage])
    assert load_shard_results(store, "v1") == {1: _counts(_result(1))}
    # the driver, reading the shard's statistics at its turn, names the file and the way out
    with pytest.raises(SemidError, match=r"shard 2 \(.*result-000002.bin\) cannot be read.*"
                                         r"Re-run the build"):
        load_shard_statistics(store, "v1", 2)
    with pytest.raises(SemidError, match=r"shard 3 \(.*result-000003.bin\) cannot be read"):
        load_shard_statistics(store, "v1", 3)  # never written


def test_damaged_statistics_inside_a_readable_result_fail_naming_the_shard(tmp_path):
    """A result whose bundle parses but whose statistics do not (or that holds none) fails
    the driver's read with the shard and file named, not a bare error."""
    store = TableStore(str(tmp_path), "t")
    save_shard_result(store, "v1", {**_result(1), "partial_tail": b"SIDPACK1" + b"\xff" * 40})
    save_shard_result(store, "v1", _counts(_result(2)))
    assert sorted(load_shard_results(store, "v1")) == [1, 2]  # their counts parse
    for index in (1, 2):
        with pytest.raises(SemidError, match=rf"shard {index} .*result-00000{index}.bin"):
            load_shard_statistics(store, "v1", index)
    # the failed read removed both files, so a re-run encodes the two shards again rather
    # than failing on them every time
    assert load_shard_results(store, "v1") == {}
