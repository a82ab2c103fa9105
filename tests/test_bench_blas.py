"""faiss's bundled OpenBLAS on a CPU it does not know: the bench loads it with the CPU's
kernels (each check in a fresh Python, where faiss is not loaded yet), and its page says
which kernels every OpenBLAS runs, what the bench set, and why not where it did not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from semid_dist.bench.blas import coretype, skip_reason
from semid_dist.bench.options import bench_options
from semid_dist.bench.page import blas_lines, machine_info
from semid_dist.quantize.cpu_blas import cpuinfo

SIMD = sorted(set(cpuinfo().get("flags", "").split()) & {"avx2", "avx512f"})

# In a fresh Python: import faiss as the bench does (fix on or off; "generic": as if faiss's
# OpenBLAS chose its generic kernels on this CPU), then what is loaded.
LOAD = """
import json, os, sys
from semid_dist.bench import blas
chosen, _ = blas._faiss_openblas()
if sys.argv[3] == "generic":
    blas._faiss_openblas = lambda: ([dict(lib, architecture="Prescott") for lib in chosen], None)
blas.import_faiss(json.loads(sys.argv[1]), fix=sys.argv[2] == "fix")
print(json.dumps({"loaded": blas.loaded_openblas(), "env": os.environ.get("OPENBLAS_CORETYPE"),
                  "chosen": chosen, **blas.record()}))
"""


def load(fix: str, simd: list[str] = SIMD, probe: str = "real", **env: str) -> dict:
    if importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss is not installed (the [cpu] extra)")
    run = subprocess.run([sys.executable, "-c", LOAD, json.dumps(simd), fix, probe],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items()
                              if k != "OPENBLAS_CORETYPE"} | env)
    seen = json.loads(run.stdout)
    if not seen["chosen"]:
        pytest.skip("this faiss brings no OpenBLAS of its own (an MKL or Accelerate build)")
    return seen


def faiss_libs(seen: dict) -> list[dict]:
    paths = {lib["path"] for lib in seen["chosen"]}
    return [lib for lib in seen["loaded"] if lib["path"] in paths]


def test_faiss_is_loaded_with_the_cpus_kernels_and_the_environment_left_as_it_was():
    """Where faiss's OpenBLAS would run its generic kernels on a CPU with AVX2 / AVX-512
    (faiss-cpu 1.15.1's 0.3.15 on a Xeon with AMX: 2.4x slower flat search), the bench's
    faiss runs the CPU's; the builds it starts inherit no OPENBLAS_CORETYPE."""
    seen = load("fix")
    assert seen["env"] is None and seen["note"] in (None, skip_reason(
        SIMD, fix=True, user_coretype=None, faiss_loaded=False))
    if coretype(SIMD):
        assert all(lib["architecture"].lower() != "prescott" for lib in seen["loaded"])
    for lib in seen["forced"]:  # only where it chose the generic ones itself
        assert lib["was"] == "Prescott" and lib["coretype"] == coretype(SIMD)
        assert lib["now"].lower() == lib["coretype"].lower()
    chose_generic = any(lib["architecture"] == "Prescott" for lib in seen["chosen"])
    assert bool(seen["forced"]) == (chose_generic and coretype(SIMD) is not None)


def test_the_override_takes_on_any_avx2_cpu():
    """The same path on any host with AVX2, the probe made to report the generic kernels:
    faiss's OpenBLAS is loaded with HASWELL's, numpy's keeps its own choice."""
    if "avx2" not in SIMD:
        pytest.skip("needs a CPU with AVX2")
    seen = load("fix", simd=["avx2"], probe="generic")
    assert [(lib["coretype"], lib["now"]) for lib in seen["forced"]] == [("HASWELL", "Haswell")]
    assert [lib["architecture"] for lib in faiss_libs(seen)] == ["Haswell"]
    assert seen["env"] is None and seen["note"] is None
    as_is = load("as-is")  # numpy's OpenBLAS, loaded before the override, keeps its choice
    assert [lib for lib in seen["loaded"] if lib not in faiss_libs(seen)] == [
        lib for lib in as_is["loaded"] if lib not in faiss_libs(as_is)]


def test_blas_as_is_and_a_users_coretype_are_kept():
    """`--blas-as-is` measures faiss's OpenBLAS with the kernels it chooses; a user's own
    OPENBLAS_CORETYPE holds (the bench sets nothing); each is the page's note."""
    as_is = load("as-is", probe="generic")
    assert as_is["forced"] == [] and as_is["note"] == "--blas-as-is"
    assert [lib["architecture"] for lib in faiss_libs(as_is)] == [
        lib["architecture"] for lib in as_is["chosen"]]
    if "avx2" not in SIMD:
        pytest.skip("a user's HASWELL needs a CPU with AVX2")
    theirs = load("fix", probe="generic", OPENBLAS_CORETYPE="HASWELL")
    assert theirs["forced"] == [] and theirs["env"] == "HASWELL"
    assert theirs["note"] == "OPENBLAS_CORETYPE=HASWELL set before the bench"
    assert [lib["architecture"] for lib in faiss_libs(theirs)] == ["Haswell"]


def test_why_the_kernels_are_left_as_they_load():
    avx = ["avx2", "avx512f"]
    assert skip_reason(avx, fix=True, user_coretype=None, faiss_loaded=False) is None
    assert skip_reason(avx, fix=False, user_coretype="ZEN", faiss_loaded=True) == "--blas-as-is"
    assert skip_reason(avx, fix=True, user_coretype="ZEN", faiss_loaded=True) == (
        "OPENBLAS_CORETYPE=ZEN set before the bench")
    assert "loaded before" in skip_reason(avx, fix=True, user_coretype=None, faiss_loaded=True)
    assert "no AVX2" in skip_reason([], fix=True, user_coretype=None, faiss_loaded=False)
    assert bench_options(only="rss,gpu", blas_as_is=True).command == (
        "semid bench --only rss,gpu --blas-as-is")


def test_the_page_names_each_openblas_kernel_choice_and_warns_of_generic_ones():
    """faiss's bundled OpenBLAS runs its generic Prescott kernels on a CPU it does not know
    (2.4x slower faiss flat search on one Xeon): the page says which kernels each OpenBLAS
    chose, and warns, naming the override, where a generic choice would inflate the ratios."""
    found = machine_info()["openblas"]  # this machine's: numpy's at least
    assert found and all(set(lib) == {"file", "version", "architecture"} for lib in found)
    faiss = {"file": "libopenblaso.so", "version": "0.3.15", "architecture": "Prescott"}
    numpy_ = {"file": "libscipy_openblas64_.so", "version": "0.3.31", "architecture": "SkylakeX"}
    lines = blas_lines({"openblas": [faiss, numpy_], "cpu_simd": ["avx2", "avx512f"]})
    assert lines[0] == ("- OpenBLAS kernels: libopenblaso.so 0.3.15 Prescott, "
                        "libscipy_openblas64_.so 0.3.31 SkylakeX")
    assert len(lines) == 2 and lines[1].endswith(
        "the ratios against it are too high; run again with OPENBLAS_CORETYPE=SKYLAKEX")
    assert blas_lines({"openblas": [faiss], "cpu_simd": ["avx2"]})[1].endswith(
        "OPENBLAS_CORETYPE=HASWELL")
    chosen = dict(faiss, architecture="SkylakeX")  # overridden, or a CPU it knows: no warning
    assert blas_lines({"openblas": [chosen], "cpu_simd": ["avx2", "avx512f"]}) == [
        "- OpenBLAS kernels: libopenblaso.so 0.3.15 SkylakeX"]
    assert blas_lines({"openblas": [faiss], "cpu_simd": []})[1:] == []  # a CPU it fits
    assert blas_lines({}) == []  # a page of an older run
    set_ = {"was": "Prescott", "coretype": "SKYLAKEX", "now": "SkylakeX"}
    lines = blas_lines({"openblas": [chosen], "cpu_simd": ["avx2", "avx512f"],
                        "openblas_forced": [dict(faiss, **set_)]})
    assert lines[1:] == [
        "- libopenblaso.so 0.3.15 (faiss's) does not know this CPU and chose its generic "
        "Prescott kernels; the bench loaded it with OPENBLAS_CORETYPE=SKYLAKEX, so faiss is "
        "measured at its best (pass --blas-as-is to measure it with the kernels it chooses)"]
    # the override did not take; the bench left the kernels: the warning says why, and what
    failed = dict(faiss, **dict(set_, now="Prescott"))
    lines = blas_lines({"openblas": [faiss], "cpu_simd": ["avx2", "avx512f"],
                        "openblas_forced": [failed]})
    assert lines[1].endswith("OPENBLAS_CORETYPE=SKYLAKEX, but it still runs its Prescott kernels")
    assert lines[2].endswith("are too high; run again with OPENBLAS_CORETYPE=SKYLAKEX")
    for note, advice in (("--blas-as-is", "run again without --blas-as-is"),
                         ("OPENBLAS_CORETYPE=PRESCOTT set before the bench",
                          "run again with OPENBLAS_CORETYPE=SKYLAKEX")):
        lines = blas_lines({"openblas": [faiss], "cpu_simd": ["avx2", "avx512f"],
                            "openblas_note": note})
        assert lines[1].endswith(f"are too high ({note}); {advice}")
