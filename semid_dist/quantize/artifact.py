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


def artifact_files(codebooks: list[np.ndarray], meta: dict[str, Any]) -> dict[str, bytes]:
    """codebooks: L arrays (k_l, d) float32 -> {file name: bytes} of the artifact."""
    arrays = {f"layer_{i}": np.ascontiguousarray(cb, dtype=np.float32)
              for i, cb in enumerate(codebooks)}
    body = dict(meta, format_version=FORMAT_VERSION, num_layers=len(codebooks),
                dim=int(codebooks[0].shape[1]),
                arrays={k: {"shape": list(v.shape), "dtype": "float32", "sha256": _digest(v)}
                        for k, v in arrays.items()})
    return {ARRAYS_FILE: st_save(arrays), META_FILE: json.dumps(body, indent=2).encode()}


def load_artifact(files: dict[str, bytes], *, where: str = "artifact") -> tuple[
        list[np.ndarray], dict[str, Any]]:
    """Inverse of `artifact_files`, verifying every array against its checksum."""
    for name in (META_FILE, ARRAYS_FILE):
        if name not in files:
            raise ArtifactError(f"{where}: missing {name}")
    try:
        meta = json.loads(files[META_FILE])
        arrays = st_load(files[ARRAYS_FILE])
        num_layers = int(meta["num_layers"])
        recorded = dict(meta["arrays"])
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"{where}: unreadable codebook artifact ({exc!r}); rebuild that "
                            "version") from None
    meta["arrays"] = recorded
    codebooks = []
    for i in range(num_layers):
        name = f"layer_{i}"
        if name not in arrays or name not in meta["arrays"]:
            raise ArtifactError(f"{where}: codebook {name} is missing")
        if _digest(arrays[name]) != meta["arrays"][name]["sha256"]:
            raise ArtifactError(f"{where}: checksum mismatch for {name}; the artifact is "
                                "corrupt or was modified, rebuild that version")
        codebooks.append(arrays[name])
    return codebooks, meta
