"""faiss at its best on a CPU its OpenBLAS does not know.

faiss-cpu's wheels bundle an OpenBLAS of their own (0.3.15 in faiss-cpu 1.15.1). On a CPU
newer than it (a Xeon with AMX, model 207) it falls back to its generic Prescott (SSE3)
kernels: faiss flat search 2.4x slower, and every ratio of ours against faiss too high.
`import_faiss` finds that in a child process before faiss is loaded here, and then loads it
with the kernels the CPU's SIMD calls for (`OPENBLAS_CORETYPE`, which OpenBLAS reads as it
loads, set for that one import: the builds the bench starts keep the environment they had);
`forced` says what it did, for the page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_forced: list[dict[str, str]] = []

# In a child process: the OpenBLAS libraries that `import faiss` adds to the ones numpy loaded.
_PROBE = """
import json
import numpy
from threadpoolctl import threadpool_info

def loaded():
    return {lib["filepath"]: lib for lib in threadpool_info()
            if lib.get("internal_api") == "openblas"}

before = loaded()
import faiss
print(json.dumps([{"file": path, "version": str(lib.get("version")),
                   "architecture": str(lib.get("architecture"))}
                  for path, lib in loaded().items() if path not in before]))
"""


def coretype(simd: list[str] | set[str]) -> str | None:
    """The OpenBLAS kernels for a CPU with these SIMD flags (`avx512f`, `avx2`), by names
    every OpenBLAS since 0.2.20 knows; None where the generic ones are its best."""
    if "avx512f" in simd:
        return "SKYLAKEX"
    return "HASWELL" if "avx2" in simd else None


def is_generic(lib: dict[str, str]) -> bool:
    return lib.get("architecture", "").lower() == "prescott"


def import_faiss(simd: list[str] | set[str], *, fix: bool = True) -> ModuleType:
    """faiss, loaded here with its OpenBLAS's best kernels for a CPU with `simd` where it
    would otherwise run the generic ones (unless `fix` is off, faiss is loaded already, or
    the user set OPENBLAS_CORETYPE: theirs holds). Raises ImportError as `import faiss`."""
    core = coretype(simd)
    if fix and core and "faiss" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ:
        generic = [lib for lib in _faiss_openblas() if is_generic(lib)]
        if generic:
            os.environ["OPENBLAS_CORETYPE"] = core
            try:
                import faiss
            finally:
                del os.environ["OPENBLAS_CORETYPE"]
            now = {lib["file"]: lib["architecture"] for lib in loaded_openblas()}
            _forced[:] = [{"file": Path(lib["file"]).name, "version": lib["version"],
                           "was": lib["architecture"], "coretype": core,
                           "now": now.get(Path(lib["file"]).name, "unknown")}
                          for lib in generic]
    import faiss

    return faiss


def forced() -> list[dict[str, str]]:
    """What `import_faiss` did in this process: each OpenBLAS it loaded with
    OPENBLAS_CORETYPE (`file`, `version`, `was`: the kernels it chose itself, `coretype`,
    `now`: the kernels it runs); [] where it left them as they load."""
    return [dict(lib) for lib in _forced]


def loaded_openblas() -> list[dict[str, str]]:
    """The OpenBLAS libraries loaded in this process (numpy's; faiss's own, once faiss is
    imported), each with its version and the kernels it chose (`architecture`)."""
    from threadpoolctl import threadpool_info

    return [{"file": Path(lib.get("filepath", "")).name, "version": str(lib.get("version")),
             "architecture": str(lib.get("architecture"))}
            for lib in threadpool_info() if lib.get("internal_api") == "openblas"]


def _faiss_openblas() -> list[dict[str, Any]]:
    """The OpenBLAS libraries `import faiss` loads, and the kernels each chooses on this CPU,
    seen in a child process; [] where it cannot tell (no faiss: the import here says why)."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                               timeout=120, check=False)
        return json.loads(probe.stdout) if probe.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return []
