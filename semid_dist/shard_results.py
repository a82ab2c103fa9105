"""A finished shard's staged result: its counts and mergeable statistics, one file per shard
in the version's staging folder.

The encode worker writes it last (`save_shard_result`, after the shard's codes and rejects),
so its presence means the shard is complete: the driver reads each shard's statistics at its
turn in the merge (`load_shard_statistics`), and a re-run of a killed build reuses the shards
whose results parse (`load_shard_results`).
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from dataclasses import asdict
from typing import Any

import numpy as np

from semid_dist import packing
from semid_dist.codes.partials import Partial
from semid_dist.errors import SemidError
from semid_dist.io import fs as fsio
from semid_dist.io.store import STAGING, FileEntry, TableStore

_BLOBS = ("partial", "partial_head", "partial_tail")  # a shard result's statistics


def result_counts(result: dict[str, Any]) -> dict[str, Any]:
    """A shard result without its statistics."""
    return {k: v for k, v in result.items() if k not in _BLOBS}


def _result_path(index: int) -> str:
    return f"{STAGING}/result-{index:06d}.bin"


def save_shard_result(store: TableStore, version_id: str, result: dict[str, Any]) -> None:
    """Persist a finished shard's result (written after its codes and rejects, so its presence
    means the shard is complete): a re-run of a killed build skips the shard. One array
    bundle: the counts as its metadata, the statistics as byte arrays."""
    meta = result_counts(result)
    if meta.get("rejects_file") is not None:
        meta["rejects_file"] = asdict(meta["rejects_file"])
    blobs = {k: np.frombuffer(result[k], dtype=np.uint8) for k in _BLOBS if k in result}
    fsio.write_bytes(store.fs, fsio.join(store.version_dir(version_id),
                                         _result_path(result["index"])), packing.pack(blobs, meta))


def _shard_result(data: bytes) -> dict[str, Any]:
    """A staged result: a bundle, or the npz of a run killed before bundles were written."""
    if packing.is_bundle(data):
        # the statistics are bundles too, each copied once when `Partial.from_bytes` reads
        # it (its float32 sums once more, into float64)
        result, blobs = packing.unpack(data, copy=False)
    else:
        blobs = dict(np.load(io.BytesIO(data), allow_pickle=False))
        result = json.loads(blobs.pop("meta").tobytes())
    if result.get("rejects_file") is not None:
        result["rejects_file"] = FileEntry(**result["rejects_file"])
    result.update({k: memoryview(blobs[k]) for k in _BLOBS if k in blobs})
    return result


def load_shard_statistics(store: TableStore, version_id: str, index: int) -> dict[str, Partial]:
    """The statistics of finished shard `index` ({"all"} or {"head", "tail"}), from its staged
    result. Raises SemidError naming the file when it is gone, does not parse, or holds no
    statistics; such a file is removed first, so a re-run of the build encodes the shard
    again (a file whose counts parse but whose statistics do not would otherwise count as
    finished, and every re-run would fail on it)."""
    folder = fsio.join(store.version_dir(version_id), STAGING)
    path = fsio.join(store.version_dir(version_id), _result_path(index))
    # a worker wrote the file after this process listed the folder (s3fs sizes a file from
    # its cached listing before reading it)
    store.fs.invalidate_cache(folder)
    try:
        try:
            data = store.fs.cat_file(path)
        except FileNotFoundError:  # the npz of a run killed before results were bundles
            legacy = path.removesuffix(".bin") + ".npz"
            if not store.fs.exists(legacy):
                raise
            path, data = legacy, store.fs.cat_file(legacy)
        blobs = _shard_result(data)
        if "partial" in blobs:
            return {"all": Partial.from_bytes(blobs["partial"])}
        return {"head": Partial.from_bytes(blobs["partial_head"]),
                "tail": Partial.from_bytes(blobs["partial_tail"])}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        with contextlib.suppress(OSError):  # gone already, or the store is unreachable
            store.fs.rm(path)
        raise SemidError(f"encode: the staged result of shard {index} ({fsio.redact_url(path)}) "
                         f"cannot be read ({type(exc).__name__}: {exc}); nothing was committed. "
                         "Re-run the build: it reuses the finished shards and encodes this one "
                         "again") from exc


def load_shard_results(store: TableStore, version_id: str) -> dict[int, dict[str, Any]]:
    """The persisted results of the shards a (killed) run of this version finished, counts
    only (`load_shard_statistics` reads a shard's statistics). A result file that does not
    parse (damaged after it was written) counts as not finished: its shard is encoded
    again, which rewrites it."""
    folder = fsio.join(store.version_dir(version_id), STAGING)
    if not store.fs.exists(folder):
        return {}
    out = {}
    for path in store.fs.ls(folder, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("result-") and name.endswith((".bin", ".npz")):
            try:
                result = _shard_result(store.fs.cat_file(path))
            except (ValueError, KeyError, EOFError, zipfile.BadZipFile):
                continue
            out[int(result["index"])] = result_counts(result)
    return out
