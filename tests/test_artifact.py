"""quantize/artifact.py: safetensors + JSON codebook artifact, checksums, no pickle."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from semid_dist.errors import ArtifactError
from semid_dist.quantize.artifact import ARRAYS_FILE, META_FILE, artifact_files, load_artifact

SIZES = (16, 32, 8)
D = 5


def codebooks(sizes=SIZES, d=D, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(k, d)).astype(dtype) for k in sizes]


def safetensors_layout(data: bytes):
    """(header dict, start of the data region) parsed by hand from the file format."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    return header, 8 + header_len


def test_round_trip_gives_identical_arrays():
    books = codebooks()
    meta = {"method": "rq_kmeans", "config": {"layers": list(SIZES)}, "stats": {"inertia": 1.5}}
    files = artifact_files(books, meta)
    assert set(files) == {ARRAYS_FILE, META_FILE}
    assert all(isinstance(v, bytes) for v in files.values())
    loaded, got_meta = load_artifact(files)
    assert len(loaded) == len(books)
    for a, b in zip(loaded, books):
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.array_equal(a, b)
    assert [c.shape[0] for c in loaded] == list(SIZES)
    for key, value in meta.items():
        assert got_meta[key] == value
    assert got_meta["num_layers"] == 3 and got_meta["dim"] == D


def test_non_float32_and_non_contiguous_inputs_are_stored_as_float32():
    books64 = codebooks(dtype=np.float64)
    transposed = [np.asfortranarray(b) for b in codebooks(seed=1)]
    for books in (books64, transposed):
        loaded, _ = load_artifact(artifact_files(books, {}))
        for a, b in zip(loaded, books):
            assert a.dtype == np.float32
            assert np.array_equal(a, b.astype(np.float32))


def test_meta_holds_a_sha256_per_array():
    books = codebooks()
    meta = json.loads(artifact_files(books, {"method": "rq_kmeans"})[META_FILE])
    assert set(meta["arrays"]) == {f"layer_{i}" for i in range(len(books))}
    for i, b in enumerate(books):
        entry = meta["arrays"][f"layer_{i}"]
        want = hashlib.sha256(np.ascontiguousarray(b, dtype=np.float32).tobytes()).hexdigest()
        assert entry["sha256"] == want
        assert entry["shape"] == list(b.shape) and entry["dtype"] == "float32"


def test_safetensors_file_holds_only_raw_float32_tensors():
    books = codebooks()
    data = artifact_files(books, {"method": "rq_kmeans"})[ARRAYS_FILE]
    # plain safetensors load (no pickle path exists in this loader) gives the arrays back
    arrays = st_load(data)
    assert set(arrays) == {f"layer_{i}" for i in range(len(books))}
    for i, b in enumerate(books):
        assert np.array_equal(arrays[f"layer_{i}"], b)
    # by hand: JSON header, then exactly the raw tensor bytes and nothing else
    header, start = safetensors_layout(data)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(tensors) == set(arrays)
    raw_total = 0
    for name, info in tensors.items():
        assert info["dtype"] == "F32"
        lo, hi = info["data_offsets"]
        assert data[start + lo:start + hi] == arrays[name].tobytes()
        raw_total += hi - lo
    assert len(data) - start == raw_total == sum(b.nbytes for b in books)
    assert not data.startswith(b"\x80")  # not a pickle stream


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tampered_array_byte_is_refused(layer):
    files = artifact_files(codebooks(), {})
    data = bytearray(files[ARRAYS_FILE])
    header, start = safetensors_layout(bytes(data))
    lo, hi = header[f"layer_{layer}"]["data_offsets"]
    data[start + (lo + hi) // 2] ^= 0x01
    with pytest.raises(ArtifactError) as exc:
        load_artifact({**files, ARRAYS_FILE: bytes(data)}, where="v1/codebooks")
    msg = str(exc.value)
    assert "checksum" in msg and f"layer_{layer}" in msg and "v1/codebooks" in msg


def test_tampered_checksum_in_meta_is_refused():
    files = artifact_files(codebooks(), {})
    meta = json.loads(files[META_FILE])
    meta["arrays"]["layer_1"]["sha256"] = "0" * 64
    with pytest.raises(ArtifactError) as exc:
        load_artifact({**files, META_FILE: json.dumps(meta).encode()})
    assert "checksum" in str(exc.value)


@pytest.mark.parametrize("missing", [ARRAYS_FILE, META_FILE])
def test_missing_file_is_refused(missing):
    files = artifact_files(codebooks(), {})
    del files[missing]
    with pytest.raises(ArtifactError) as exc:
        load_artifact(files)
    assert missing in str(exc.value)


def test_missing_layer_is_refused():
    files = artifact_files(codebooks(), {})
    meta = json.loads(files[META_FILE])
    meta["num_layers"] = 4
    with pytest.raises(ArtifactError) as exc:
        load_artifact({**files, META_FILE: json.dumps(meta).encode()})
    assert "layer_3" in str(exc.value)


UNREADABLE = r"^artifact: unreadable codebook artifact \({}.*\); rebuild that version$"


def test_unreadable_meta_is_refused():
    files = artifact_files(codebooks(), {})
    with pytest.raises(ArtifactError, match=UNREADABLE.format("JSONDecodeError")):
        load_artifact({**files, META_FILE: b"{not json"})


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_corrupt_safetensors_bytes_are_refused(cut):
    files = artifact_files(codebooks(), {})
    bad = files[ARRAYS_FILE][:-7] if cut == "truncated" else b"garbage!"
    with pytest.raises(ArtifactError, match=UNREADABLE.format("SafetensorError")):
        load_artifact({**files, ARRAYS_FILE: bad})


@pytest.mark.parametrize("meta_bytes", [b"{}", b"[1, 2]", b'{"num_layers": 3}'])
def test_meta_without_required_fields_is_refused(meta_bytes):
    files = artifact_files(codebooks(), {})
    with pytest.raises(ArtifactError, match=UNREADABLE.format("")):
        load_artifact({**files, META_FILE: meta_bytes})
