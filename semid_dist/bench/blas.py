"""faiss at its best on a CPU its OpenBLAS does not know.

faiss-cpu's wheels bundle an OpenBLAS of their own (0.3.15 in faiss-cpu 1.15.1). On a CPU
newer than it (a Xeon with AMX, model 207) it falls back to its generic Prescott (SSE3)
kernels: faiss flat search 2.4x slower, and every ratio of ours against faiss too high.
`import_faiss` finds that in a child process before faiss is loaded here, and then loads it
with the kernels the CPU's SIMD calls for (`OPENBLAS_CORETYPE`, which OpenBLAS reads as it
loads, set for that one import: the builds the bench starts keep the environment they had);
`record` says what it did, or why it did nothing, for the page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from types import ModuleType
from typing import Any

_record: dict[str, Any] = {"forced": [], "note": None}

# In a child process: the OpenBLAS libraries that `import faiss` adds to the ones numpy loaded.
_PROBE = """
import json
import numpy
from semid_dist.bench.blas import loaded_openblas

before = {lib["path"] for lib in loaded_openblas()}
import faiss
print(json.dumps([lib for lib in loaded_openblas() if lib["path"] not in before]))
"""


def coretype(simd: Collection[str]) -> str | None:
    """The OpenBLAS kernels for a CPU with these SIMD flags (`avx512f`, `avx2`), by names
    every OpenBLAS since 0.2.20 knows; None where the generic ones are its best."""
    if "avx512f" in simd:
        return "SKYLAKEX"
    return "HASWELL" if "avx2" in simd else None


def is_generic(lib: dict[str, str]) -> bool:
    """Whether an OpenBLAS runs its generic kernels (the ones it falls back to on a CPU it
    does not know)."""
    return lib.get("architecture", "").lower() == "prescott"


def skip_reason(simd: Collection[str], *, fix: bool, user_coretype: str | None,
                faiss_loaded: bool) -> str | None:
    """Why `import_faiss` leaves faiss's kernels as they load, before it looks at them;
    None where it looks."""
    if not fix:
        return "--blas-as-is"
    if user_coretype is not None:
        return f"OPENBLAS_CORETYPE={user_coretype} set before the bench"
    if faiss_loaded:
        return "faiss was loaded before the bench could choose its kernels"
    if coretype(simd) is None:
        return "no AVX2 or AVX-512: the generic kernels are this CPU's"
    return None


def import_faiss(simd: Collection[str], *, fix: bool = True) -> ModuleType:
    """faiss, loaded here with its OpenBLAS's best kernels for a CPU with `simd` where it
    would otherwise run the generic ones; left as it loads with `fix` off, where faiss is
    loaded already, or where the user set OPENBLAS_CORETYPE (theirs holds). Raises
    ImportError as `import faiss` does."""
    import numpy  # noqa: F401 - its own OpenBLAS loads before the override, as it chose

    reason = skip_reason(simd, fix=fix, user_coretype=os.environ.get("OPENBLAS_CORETYPE"),
                         faiss_loaded="faiss" in sys.modules)
    _record.update(forced=[], note=reason)
    if reason is None:
        found, failed = _faiss_openblas()
        generic = [lib for lib in found if is_generic(lib)]
        _record["note"] = failed
        if generic:
            core = coretype(simd)
            os.environ["OPENBLAS_CORETYPE"] = core
            try:
                import faiss
            finally:
                del os.environ["OPENBLAS_CORETYPE"]
            now = {lib["path"]: lib["architecture"] for lib in loaded_openblas()}
            _record["forced"] = [
                {"file": lib["file"], "version": lib["version"], "was": lib["architecture"],
                 "coretype": core, "now": now.get(lib["path"], "unknown")} for lib in generic]
    import faiss

    return faiss


def record() -> dict[str, Any]:
    """What `import_faiss` did in this process: `forced`, each OpenBLAS it loaded with
    OPENBLAS_CORETYPE (`file`, `version`, `was`: the kernels it chose itself, `coretype`,
    `now`: the kernels it runs), and `note`, why it set nothing where it did not look or
    could not (None where it looked and all was well)."""
    return {"forced": [dict(lib) for lib in _record["forced"]], "note": _record["note"]}


def loaded_openblas(*, paths: bool = True) -> list[dict[str, str]]:
    """The OpenBLAS libraries loaded in this process (numpy's; faiss's own, once faiss is
    imported), each with its file name (and `path`), version and the kernels it chose
    (`architecture`)."""
    from threadpoolctl import threadpool_info

    libs = [{"file": Path(lib.get("filepath", "")).name, "path": str(lib.get("filepath")),
             "version": str(lib.get("version")), "architecture": str(lib.get("architecture"))}
            for lib in threadpool_info() if lib.get("internal_api") == "openblas"]
    return libs if paths else [{k: v for k, v in lib.items() if k != "path"} for lib in libs]


def _faiss_openblas() -> tuple[list[dict[str, str]], str | None]:
    """The OpenBLAS libraries `import faiss` loads and the kernels each chooses on this CPU,
    seen in a child process, and why not where it cannot tell (no faiss: the import here
    then says why)."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                               timeout=120, check=False)
        if probe.returncode == 0:
            return json.loads(probe.stdout), None
        last = (probe.stderr.strip().splitlines() or [f"status {probe.returncode}"])[-1]
        return [], f"the child process that looks at faiss's OpenBLAS failed: {last}"
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return [], f"the child process that looks at faiss's OpenBLAS failed: {exc}"
