"""Raw array bundles: a JSON header and the arrays' bytes, for what encode workers stage for
the driver and for a resumed run (a shard's result and statistics).

An encode shard's statistics hold several MB of sums (5.9 MiB for a 65,536-row shard of the
benchmark catalog, in float32). As npz they were zipped twice (the statistics, then the
shard result holding them), each a growing in-memory buffer with a CRC over every byte; a
bundle is one join of the arrays' bytes, and reading one is a view per array.

Layout: MAGIC, the header's length (8 bytes, little endian), the header (UTF-8 JSON:
{"meta": ..., "arrays": [[name, dtype, shape, offset, nbytes], ...]}), then each array's
bytes at its offset from the end of the header, every offset a multiple of 8.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

MAGIC = b"SIDPACK1"
_ALIGN = 8


def is_bundle(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:len(MAGIC)]) == MAGIC


def pack(arrays: dict[str, np.ndarray], meta: Any = None) -> bytes:
    """One bundle of `arrays` (any numeric dtypes and shapes) and JSON-able `meta`."""
    entries, pieces, offset = [], [], 0
    for name, arr in arrays.items():
        shape = list(np.shape(arr))  # before ascontiguousarray, which makes a 0-d array 1-d
        arr = np.ascontiguousarray(arr)
        if arr.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype object; a bundle holds numbers only")
        entries.append([name, arr.dtype.str, shape, offset, arr.nbytes])
        pieces.append(memoryview(arr).cast("B") if arr.nbytes else b"")
        pad = -arr.nbytes % _ALIGN
        if pad:
            pieces.append(b"\0" * pad)
        offset += arr.nbytes + pad
    header = json.dumps({"meta": meta, "arrays": entries}).encode()
    header += b" " * (-(len(MAGIC) + 8 + len(header)) % _ALIGN)
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *pieces])


def unpack(data: bytes | bytearray | memoryview, *, copy: bool = True,
           ) -> tuple[Any, dict[str, np.ndarray]]:
    """(meta, {name: array}) of a bundle. The arrays are writable views of one copy of
    `data`, or with `copy=False` views of `data` itself (read-only where `data` is bytes).
    Raises ValueError naming the problem when `data` is not a whole bundle."""
    view = memoryview(data)
    start = len(MAGIC) + 8
    if len(view) < start or not is_bundle(view):
        raise ValueError("not an array bundle (no SIDPACK1 header); the file is from another "
                         "tool or truncated")
    (size,) = struct.unpack("<Q", view[len(MAGIC):start])
    if start + size > len(view):
        raise ValueError(f"array bundle truncated: header of {size} bytes, "
                         f"{len(view) - start} present")
    header = json.loads(bytes(view[start:start + size]))
    body = bytearray(view[start + size:]) if copy else view[start + size:]
    arrays = {}
    for name, dtype, shape, offset, nbytes in header["arrays"]:
        if offset + nbytes > len(body):
            raise ValueError(f"array bundle truncated: array {name!r} ends at byte "
                             f"{offset + nbytes}, the data holds {len(body)}")
        dt = np.dtype(dtype)
        arrays[name] = (np.frombuffer(body, dtype=dt, count=nbytes // dt.itemsize,
                                      offset=offset).reshape(shape)
                        if nbytes else np.empty(shape, dtype=dt))
    return header["meta"], arrays
