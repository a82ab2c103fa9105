"""Codebook artifact: safetensors arrays + JSON metadata with a sha256 per array.

No pickle anywhere: `load_artifact` parses safetensors and JSON only and refuses an artifact
whose arrays do not match their recorded checksums.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from semid_dist.errors import ArtifactError

ARRAYS_FILE = "codebooks.safetensors"
META_FILE = "codebooks.json"
FORMAT_VERSION = 1


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def artifact_files(codebooks: list[np.ndarray], meta: dict[str, Any], *,
                   tensors: dict[str, np.ndarray] | None = None) -> dict[str, bytes]:
    """codebooks: L arrays (k_l, d) float32 -> {file name: bytes} of the artifact.

    tensors: further named float32 arrays (a learned quantizer's weights, names not starting
    with `layer_`), stored and checksummed the same way."""
    arrays = {f"layer_{i}": np.ascontiguousarray(cb, dtype=np.float32)
              for i, cb in enumerate(codebooks)}
    for name, a in (tensors or {}).items():
        if name.startswith("layer_"):
            raise ValueError(f"tensor name {name!r} clashes with the codebook names layer_<i>")
        arrays[name] = np.ascontiguousarray(a, dtype=np.float32)
    body = dict(meta, format_version=FORMAT_VERSION, num_layers=len(codebooks),
                dim=int(codebooks[0].shape[1]),
                arrays={k: {"shape": list(v.shape), "dtype": "float32", "sha256": _digest(v)}
                        for k, v in arrays.items()})
    return {ARRAYS_FILE: st_save(arrays), META_FILE: json.dumps(body, indent=2).encode()}


def load_artifact(files: dict[str, bytes], *, where: str = "artifact") -> tuple[
        list[np.ndarray], dict[str, Any]]:
    """Inverse of `artifact_files`, verifying every array against its checksum."""
    codebooks, _, meta = load_artifact_tensors(files, where=where)
    return codebooks, meta


def load_artifact_tensors(files: dict[str, bytes], *, where: str = "artifact") -> tuple[
        list[np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """-> (codebooks, the other named tensors, meta), every array verified against its
    recorded sha256; an array in the file without a recorded checksum is refused too."""
    for name in (META_FILE, ARRAYS_FILE):
        if name not in files:
            raise ArtifactError(f"{where}: missing {name}")
    try:
        meta = json.loads(files[META_FILE])
        arrays = st_load(files[ARRAYS_FILE])
        num_layers = int(meta["num_layers"])
        recorded = dict(meta["arrays"])
        digests = {k: v["sha256"] for k, v in recorded.items()}
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"{where}: unreadable codebook artifact ({exc!r}); rebuild that "
                            "version") from None
    meta["arrays"] = recorded
    unrecorded = sorted(set(arrays) - set(recorded))
    if unrecorded:
        raise ArtifactError(f"{where}: array {unrecorded[0]} has no recorded checksum; the "
                            "artifact was modified, rebuild that version")
    for name in sorted(recorded):
        if name not in arrays:
            raise ArtifactError(f"{where}: {'codebook ' if name.startswith('layer_') else ''}"
                                f"{name} is missing")
        if _digest(arrays[name]) != digests[name]:
            raise ArtifactError(f"{where}: checksum mismatch for {name}; the artifact is "
                                "corrupt or was modified, rebuild that version")
    codebooks = []
    for i in range(num_layers):
        name = f"layer_{i}"
        if name not in arrays or name not in recorded:
            raise ArtifactError(f"{where}: codebook {name} is missing")
        codebooks.append(arrays[name])
    tensors = {k: v for k, v in arrays.items() if not k.startswith("layer_")}
    return codebooks, tensors, meta
