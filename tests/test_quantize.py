"""Numeric core: k-means statistics, residual k-means, encode kernel, quality vs faiss."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from semid_dist.quantize import (
    cpu_blas,
    decode,
    encode_batch,
    fit_residual_kmeans,
    kmeans,
    nearest,
    torch_kernel,
)
from semid_dist.quantize import encode as encode_mod
from semid_dist.quantize.cpu_blas import set_cpu_threads
from semid_dist.quantize.encode import (
    CPU_TILE_BYTES,
    CPU_TILE_MIN_ROWS,
    GPU_TILE_BYTES,
    tile_rows,
)
from semid_dist.quantize.group_sum import exact_scale, group_sum, unit_group_sum
from semid_dist.quantize.kmeans import _sample_scale, kmeans_plusplus, lloyd_stats
from semid_dist.quantize.residual import init_subset
from tests.conftest import DEMO, clustered


def test_core_imports_without_ray_or_pyspark():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "sys.modules['pyspark'] = None\n"
        "import semid_dist, semid_dist.quantize, semid_dist.codes, semid_dist.io.store\n"
        "import semid_dist.pipeline, semid_dist.cli, semid_dist.stages\n"
        "import semid_dist.quantize.artifact, semid_dist.engines.local\n"
        "assert 'ray' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_nearest_matches_brute_force_and_is_chunk_independent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 9)).astype(np.float32)
    c = rng.normal(size=(37, 9)).astype(np.float32)
    brute = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    labels, dist = nearest(x, c, chunk_rows=64)
    assert (labels == brute.argmin(1)).all()
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4, atol=1e-4)
    labels_big, _ = nearest(x, c, chunk_rows=100_000)
    assert (labels == labels_big).all()


def test_nearest_ties_go_to_the_lowest_code():
    rng = np.random.default_rng(4)
    c = rng.normal(size=(6, 5)).astype(np.float32)
    c = np.concatenate([c, c[::-1]])  # every codeword twice: at j and at 11 - j
    x = np.concatenate([c[:6], rng.normal(size=(300, 5)).astype(np.float32)])
    labels, _ = nearest(x, c, chunk_rows=7)
    assert (labels < 6).all()
    assert (labels[:6] == np.arange(6)).all()
    enc = encode_batch([c, c], x, chunk_rows=7)
    assert (enc.codes < 6).all()


def test_encode_decode_consistency_and_residuals():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    books = [rng.normal(size=(k, 8)).astype(np.float32) for k in (16, 4, 9)]
    enc = encode_batch(books, x, chunk_rows=77)
    assert enc.codes.shape == (500, 3) and enc.codes.dtype == np.int32
    # greedy: each layer's code is the nearest codeword to the residual so far
    r = x.copy()
    for layer, cb in enumerate(books):
        expect, _ = nearest(r, cb)
        assert (enc.codes[:, layer] == expect).all()
        r = r - cb[expect]
    recon = decode(books, enc.codes)
    np.testing.assert_allclose(enc.qerr, ((x - recon) ** 2).sum(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(enc.sq_residual[:, 0], ((x - books[0][enc.codes[:, 0]]) ** 2).sum(1),
                               rtol=1e-4, atol=1e-5)


def test_numpy_cpu_kernel_matches_the_torch_kernel_and_its_candidates():
    """The CPU runs the numpy kernel; the torch kernel (what an accelerator runs) on the same
    input gives the same codes but for fp32 near-ties, and the candidate lists agree."""
    x = clustered(3000, 16, clusters=12, seed=5)
    books = [clustered(k, 16, clusters=4, seed=6 + k) * s
             for k, s in ((64, 1.0), (32, 0.4), (48, 0.2))]
    cpu = encode_batch(books, x, chunk_rows=500, candidates=4)
    n, n_layers, n_alt = len(x), len(books), 4
    ref = {"codes": np.empty((n, n_layers), np.int32), "sq_res": np.empty((n, n_layers),
           np.float32), "alt_codes": np.empty((n, n_alt), np.int32),
           "alt_err": np.empty((n, n_alt), np.float32)}
    torch_kernel.encode_torch(books, x, 500, "cpu", "fp32", 8, ref["codes"], ref["sq_res"],
                             ref["alt_codes"], ref["alt_err"])
    assert (cpu.codes == ref["codes"]).all(axis=1).mean() >= 0.999
    np.testing.assert_allclose(cpu.sq_residual, ref["sq_res"], rtol=1e-4, atol=1e-5)
    # the candidates: column 0 is the greedy code, then ascending error, all distinct codes
    assert (cpu.alt_codes[:, 0] == cpu.codes[:, -1]).all()
    assert (np.diff(cpu.alt_err[:, 1:], axis=1) >= 0).all()
    assert all(len(set(row)) == n_alt for row in cpu.alt_codes[:50])
    np.testing.assert_allclose(cpu.alt_err[:, 1:], ref["alt_err"][:, 1:], rtol=1e-4, atol=1e-5)
    # the chunking does not change the codes
    assert (encode_batch(books, x, chunk_rows=4096).codes == cpu.codes).all()


def test_cpu_kernel_row_split_across_threads_gives_identical_results():
    """With several threads the CPU kernel splits the chunks into one block per thread; every
    output is bit-identical to the one-thread run, and no BLAS limit is left behind."""
    from threadpoolctl import threadpool_info

    x = clustered(5000, 24, clusters=16, seed=8)
    books = [clustered(k, 24, clusters=4, seed=9 + k) * s for k, s in ((96, 1.0), (40, 0.3))]
    blas_before = sorted(lib["num_threads"] for lib in threadpool_info())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encode_batch(books, x, chunk_rows=300, candidates=3)
        one_nearest = nearest(x, books[0], chunk_rows=300)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            many = encode_batch(books, x, chunk_rows=300, candidates=3)
            for name in ("codes", "sq_residual", "alt_codes", "alt_err"):
                np.testing.assert_array_equal(getattr(many, name), getattr(one, name))
            labels, dists = nearest(x, books[0], chunk_rows=300)
            np.testing.assert_array_equal(labels, one_nearest[0])
            np.testing.assert_array_equal(dists, one_nearest[1])
    finally:
        torch.set_num_threads(before)
    assert sorted(lib["num_threads"] for lib in threadpool_info()) == blas_before


def test_kernel_holds_numpy_blas_at_one_thread_whatever_thread_set_the_count():
    """A thread that set the thread count (and still lives) must not keep the kernel's
    blocks from running on a one-thread BLAS: that is what makes them thread-count free."""
    from threadpoolctl import threadpool_info

    def numpy_blas() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"
                and ("numpy" in lib["filepath"] or "scipy_openblas" in lib["filepath"])}

    if not numpy_blas():
        pytest.skip("threadpoolctl does not see numpy's BLAS here")
    before = torch.get_num_threads()
    set_done, release = threading.Event(), threading.Event()

    def setter() -> None:
        set_cpu_threads(3)
        set_done.set()
        release.wait(30)

    other = threading.Thread(target=setter)
    other.start()
    seen: list[set[int]] = []
    try:
        assert set_done.wait(30)
        assert numpy_blas() == {3}
        cpu_blas.row_parallel(lambda rows: seen.append(numpy_blas()), 1000, 100, 2)
        assert numpy_blas() == {3}  # restored after the kernel
    finally:
        release.set()
        other.join()
        set_cpu_threads(before)
        torch.set_num_threads(before)
    assert seen == [{1}, {1}]


def test_kernel_runs_mkl_at_one_thread_in_every_block_and_restores_the_callers():
    """The kernel's sgemm goes through torch's MKL, whose thread count torch sets for the
    calling thread only: each block (the caller's and the pool's) must run it on one thread,
    and the caller's own count must be back afterwards."""
    if cpu_blas.mkl_local_threads() is None:
        pytest.skip("torch has no MKL here: the kernel multiplies on numpy's BLAS")
    lib = ctypes.CDLL(cpu_blas.torch_cpu_library())
    mkl_threads = lib.MKL_Get_Max_Threads
    mkl_threads.restype = ctypes.c_int
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert mkl_threads() == 3
        seen: list[int] = []
        cpu_blas.row_parallel(lambda rows: seen.append(mkl_threads()), 1000, 100, 3)
        assert seen == [1, 1, 1]
        assert mkl_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_kernel_stays_fp32_when_torch_matmul_precision_is_lowered(monkeypatch):
    """A process that lowers torch's fp32 matmul precision (training scripts set "medium",
    which makes torch's CPU matmul round to bf16) must still get the exact kernel's codes
    and distances: the kernel then multiplies on numpy's BLAS (checked as on an Intel CPU,
    where MKL multiplies otherwise)."""
    monkeypatch.setattr(cpu_blas, "_cpu_vendor", "GenuineIntel")
    rng = np.random.default_rng(21)
    x = rng.normal(size=(3000, 64)).astype(np.float32)
    books = [rng.normal(size=(256, 64)).astype(np.float32) * s for s in (1.0, 0.5)]
    exact = encode_batch(books, x)
    labels, dists = nearest(x, books[0])
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert encode_mod._CpuBook.of(books[0]).aug_t is None
        lowered = encode_batch(books, x)
        low_labels, low_dists = nearest(x, books[0])
    finally:
        torch.set_float32_matmul_precision(before)
    np.testing.assert_array_equal(lowered.codes, exact.codes)
    np.testing.assert_allclose(lowered.sq_residual, exact.sq_residual, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(low_labels, labels)
    np.testing.assert_allclose(low_dists, dists, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_blas.mkl_local_threads(), reason="torch has no MKL here")
@pytest.mark.parametrize("way", ["amd cpu", "no mkl"])
def test_kernel_on_numpy_blas_gives_the_mkl_kernels_codes(monkeypatch, way):
    """On an AMD CPU (where MKL is the slower), or where torch has no MKL, the same operands
    go through numpy's BLAS: the same codes (the sums may round differently in the last bit,
    so distances agree to fp32 precision)."""
    rng = np.random.default_rng(22)
    x = rng.normal(size=(4000, 32)).astype(np.float32)
    books = [rng.normal(size=(128, 32)).astype(np.float32) * s for s in (1.0, 0.5, 0.25)]
    monkeypatch.setattr(cpu_blas, "_cpu_vendor", "GenuineIntel")
    assert encode_mod._CpuBook.of(books[0]).aug_t is not None  # MKL multiplies
    first = encode_batch(books, x, candidates=3)
    if way == "amd cpu":
        monkeypatch.setattr(cpu_blas, "_cpu_vendor", "AuthenticAMD")
    else:
        monkeypatch.setattr(cpu_blas, "_mkl_local", False)
        assert cpu_blas.mkl_local_threads() is None
    assert encode_mod._CpuBook.of(books[0]).aug_t is None  # numpy's BLAS multiplies
    other = encode_batch(books, x, candidates=3)
    np.testing.assert_array_equal(other.codes, first.codes)
    np.testing.assert_array_equal(other.alt_codes, first.alt_codes)
    np.testing.assert_allclose(other.sq_residual, first.sq_residual, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_cpu_vendor_is_read_from_the_machine():
    """The vendor that picks the kernel's BLAS is this machine's `vendor_id`."""
    with open("/proc/cpuinfo") as info:
        want = next((line.split(":", 1)[1].strip() for line in info
                     if line.startswith("vendor_id")), "")
    assert cpu_blas.cpu_vendor() == want


def test_group_sum_is_one_thread_and_the_same_from_any_thread():
    """The float64 group sum (here its unit-vector form, which runs the same loop and more)
    runs torch on one thread (off the main thread, as in a Ray Train worker, multi-threaded
    torch ran 10x slower): the same bits from the main thread and a worker thread at any
    thread count, and the caller's thread count is left as it was."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(9000, 16)).astype(np.float32)
    index = rng.integers(0, 50, len(x))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want, want_sq = unit_group_sum(index, x, 50, chunk_rows=1000)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            got_sums, got_sq = unit_group_sum(index, x, 50, chunk_rows=1000)
            np.testing.assert_array_equal(got_sums, want)
            np.testing.assert_array_equal(got_sq, want_sq)
            assert torch.get_num_threads() == threads
            got: list = []

            def in_thread(n: int, out: list) -> None:
                torch.set_num_threads(n)
                out.append(unit_group_sum(index, x, 50, chunk_rows=1000)[0])
                out.append(torch.get_num_threads())

            worker = threading.Thread(target=in_thread, args=(threads, got))
            worker.start()
            worker.join()
            np.testing.assert_array_equal(got[0], want)
            assert got[1] == threads
    finally:
        torch.set_num_threads(before)
    # row by row in float64, as the docstring says
    ref = np.zeros((50, 16))
    x64 = x.astype(np.float64)
    np.add.at(ref, index, x64 / np.linalg.norm(x64, axis=1, keepdims=True))
    np.testing.assert_allclose(want, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, d", [(0, 37), (1, 37), (4095, 37), (4097, 128), (10000, 37),
                                  (300, 8192)])
def test_unit_group_sum_lengths_are_einsums_in_float64_bit_for_bit(n, d):
    """The squared lengths of the one pass are numpy's float64 einsum of each row, bit for
    bit, whatever the chunk; the sums are those of `group_sum` of the rows times 1 / their
    lengths, bit for bit; rows of length 0 add nothing (a group of them alone sums to 0)."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)).astype(np.float32) * 1e3
    x[::6] = 0.0
    index = rng.integers(0, 5, n)
    index[::6] = 5  # group 5: zero rows only
    want_sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    x64 = x.astype(np.float64)
    factor = np.divide(1.0, np.sqrt(want_sq), out=np.zeros(n), where=want_sq > 0)
    unit = x64 * factor[:, None]
    want = group_sum(index, unit, 6)
    for chunk_rows in (4096, 7):
        sums, sq = unit_group_sum(index, x, 6, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(sq, want_sq)
        np.testing.assert_array_equal(sums, want)
        assert not sums[5].any()
    take = np.arange(n)[::-2].copy()  # a subset of the rows, gathered: their lengths only
    sums, sq = unit_group_sum(index[take], x, 6, take=take, chunk_rows=7)
    np.testing.assert_array_equal(sq, want_sq[take])
    np.testing.assert_array_equal(sums, group_sum(index[take], unit[take], 6))


def test_set_cpu_threads_limits_torch_and_numpy_blas():
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    before_torch, before_blas = torch.get_num_threads(), max(blas_threads())
    try:
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1 and blas_threads() == {1}
        set_cpu_threads(2)
        assert torch.get_num_threads() == 2 and blas_threads() == {2}
    finally:
        set_cpu_threads(before_torch)
        set_cpu_threads(before_blas)
        torch.set_num_threads(before_torch)


def test_lloyd_stats_are_sums_and_counts():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    c = x[:6].copy()
    sums, counts, inertia = lloyd_stats(x, c)
    labels, dist = nearest(x, c)
    for j in range(6):
        np.testing.assert_allclose(sums[j], x[labels == j].astype(np.float64).sum(0), rtol=1e-6)
        assert counts[j] == (labels == j).sum()
    assert inertia == pytest.approx(float(dist.sum()), rel=1e-5)


def test_group_sum_equals_sequential_float64_accumulation():
    """Bit-identical to adding the rows one by one in float64, in row order, whatever the
    conversion chunk or thread count: sums stay deterministic on every engine."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5000, 7)).astype(np.float32) * 1e3
    idx = rng.integers(0, 40, 5000)
    expect = np.zeros((43, 7))
    np.add.at(expect, idx, x.astype(np.float64))
    assert np.array_equal(group_sum(idx, x, 43), expect)
    assert np.array_equal(group_sum(idx, x, 43, chunk_rows=333), expect)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert np.array_equal(group_sum(idx, x.astype(np.float64), 43), expect)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("k, d, rows", [(256, 128, 2688), (256, 768, 1024), (64, 16, 8192),
                                        (4096, 128, 512), (1 << 20, 64, 512)])
def test_cpu_tile_keeps_scores_small_and_gpu_tile_fills_its_bytes(k, d, rows):
    assert tile_rows(8192, k, d) == rows
    assert 4 * rows * (k + d) <= CPU_TILE_BYTES or rows == CPU_TILE_MIN_ROWS
    assert tile_rows(100, k, d) == min(100, rows)
    gpu = tile_rows(8192, k, d, "cuda:0")
    assert gpu == tile_rows(100, k, d, "cuda") and gpu % 1024 == 0
    assert (4 * gpu * (k + d) <= GPU_TILE_BYTES < 4 * (gpu + 1024) * (k + d)) or gpu == 1024


def test_kmeans_plusplus_picks_distinct_points_and_is_seeded():
    x = clustered(400, 6, seed=3)
    a = kmeans_plusplus(x, 20, seed=5)
    b = kmeans_plusplus(x, 20, seed=5)
    assert np.array_equal(a, b)
    assert len(np.unique(a, axis=0)) == 20
    assert not np.array_equal(a, kmeans_plusplus(x, 20, seed=6))


def test_kmeans_decreases_mse_and_is_deterministic():
    x = clustered(2000, 8, seed=4)
    c1, s1 = kmeans(x, 16, niter=10, seed=0)
    c2, _ = kmeans(x, 16, niter=10, seed=0)
    assert np.array_equal(c1, c2)
    mses = [h["mse"] for h in s1["iterations"]]
    assert mses[-1] < mses[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(mses, mses[1:]))


class ThreadAllReduce:
    """A real in-process collective: `world` threads each contribute, all get the sum."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=120)  # (a thread that raised: fail)
        self.lock = threading.Lock()
        self.parts: list[np.ndarray] = []
        self.result: np.ndarray | None = None

    def __call__(self, a: np.ndarray) -> np.ndarray:
        with self.lock:
            self.parts.append(np.array(a))
        if self.barrier.wait() == 0:
            self.result = np.sum(self.parts, axis=0)
            self.parts = []
        self.barrier.wait()
        return self.result.copy()


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_with_all_reduce_equal_one_worker_bit_for_bit(workers):
    """Exact data-parallel k-means: N shards + summed statistics == 1 worker on everything,
    to the last bit (the sums are exact: `group_sum`'s scale)."""
    x = clustered(3000, 6, seed=5) * np.float32(7.3)
    single, _ = fit_residual_kmeans(x, [12, 6], niter=6, seed=1, init_points=x)
    collective = ThreadAllReduce(workers)
    out: dict[int, list[np.ndarray]] = {}

    def worker(rank: int) -> None:
        out[rank], _ = fit_residual_kmeans(x[rank::workers], [12, 6], niter=6, seed=1,
                                           init_points=x, all_reduce=collective)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for layer in range(2):
        for rank in range(workers):
            assert np.array_equal(out[rank][layer], single[layer])


def _in_threads(n: int, fn) -> dict[int, object]:
    """{rank: fn(rank)} for ranks 0..n-1, each in a thread of its own (as workers)."""
    out: dict[int, object] = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r))) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_a_worker_without_rows_leaves_the_fit_as_it_is():
    """A Ray Train worker may hold no row of a layer's sample (more workers than rows) or
    only zero rows: it sets no exponent of the common fixed point (at exponent 0 it gave a
    sample under 0.5 in size a coarser scale than one process's, moving centroids' last
    bits): the fit is one process's over all the rows, bit for bit."""
    x = (clustered(600, 6, seed=7) * np.float32(0.01)).astype(np.float32)
    for empty in (x[:0], np.zeros((5, 6), np.float32)):
        rows, parts = np.concatenate([x, empty]), [x[0::2], x[1::2], empty]
        single, _ = fit_residual_kmeans(rows, [8, 4], niter=4, seed=1, init_points=x)
        fit, fix = ThreadAllReduce(3), ThreadAllReduce(3)
        fits = _in_threads(3, lambda r, parts=parts, c=fit: fit_residual_kmeans(
            parts[r], [8, 4], niter=4, seed=1, init_points=x, all_reduce=c)[0])
        for books in fits.values():
            assert all(np.array_equal(books[i], single[i]) for i in range(2)), len(empty)
        scales = _in_threads(3, lambda r, parts=parts, c=fix: _sample_scale(parts[r], c))
        assert set(scales.values()) == {_sample_scale(rows, lambda a: a)}  # one process's


def test_a_centroid_does_not_depend_on_the_workers_split_of_its_rows():
    """Four rows of one cluster whose float64 sum depends on the order of its terms: in
    row order 2^40 + (1 + 2^-22) drops the 2^-22 (mean 0.5), and split over two workers by
    stride (2^40 - 2^40, then 1 + 2^-22 + 1) keeps it (mean 0.5 + 2^-24, a float32 of its
    own): a 2-worker fit gave another centroid than one process. Now both the same."""
    x = np.array([[2.0 ** 40], [1 + 2.0 ** -22], [-(2.0 ** 40)], [1.0]], np.float32)
    start = np.zeros((1, 1), np.float32)
    single, _ = kmeans(x, 1, niter=1, init_centroids=start)
    collective = ThreadAllReduce(2)
    out: dict[int, np.ndarray] = {}

    def worker(rank: int) -> None:
        out[rank], _ = kmeans(x[rank::2], 1, niter=1, init_centroids=start,
                              all_reduce=collective)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(out[0], single) and np.array_equal(out[1], single)
    assert single[0, 0] == np.float32(0.5)  # (1 + 2^-22 rounds to 1 at the scale of 2^40)


def test_scaled_group_sums_are_exact_in_any_split_and_order():
    """With `exact_scale` the grouped sums of rows split into parts, added part by part,
    equal the sums of all the rows at once bit for bit, whatever the split and order
    (plain float64 sums of these values do not: checked, so the data can tell), and the
    rounding moves a value by at most max|x| 2^(b - 53)."""
    rng = np.random.default_rng(4)
    n, d, k = 20_000, 5, 7
    x = (rng.standard_normal((n, d)) * np.exp(rng.uniform(-12, 12, (n, 1)))).astype(np.float32)
    index = rng.integers(0, k, n)
    scale = exact_scale(float(np.abs(x).max()), n)
    assert math.log2(scale).is_integer()
    whole = group_sum(index, x, k, scale=scale)
    plain_differs = False
    for parts in (2, 3, 5):
        cuts = np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False))
        pieces = list(zip(np.split(index, cuts), np.split(x, cuts)))[::-1]  # (last first)
        split = sum(group_sum(i, v, k, scale=scale) for i, v in pieces)
        assert np.array_equal(split, whole)
        plain = sum(group_sum(i, v, k) for i, v in pieces)
        plain_differs |= not np.array_equal(plain, group_sum(index, x, k))
    assert plain_differs
    assert np.abs(np.rint(x.astype(np.float64) * scale)).max() <= 2.0 ** (53 - n.bit_length())
    exact = np.zeros((k, d))
    np.add.at(exact, index, x.astype(np.float64))
    assert np.abs(whole / scale - exact).max() <= (
        n * np.abs(x).max() * 2.0 ** (n.bit_length() - 53))


def test_empty_clusters_are_reseeded():
    # four tight, far-apart blobs; every centroid starts on one point, so all items go to the
    # first (ties take the lowest index) and the other three are empty: only re-seeding them
    # (splitting the largest cluster) lets Lloyd find the blobs
    rng = np.random.default_rng(3)
    corners = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], np.float32)
    x = (np.repeat(corners, 25, axis=0) + rng.normal(0, 0.1, (100, 2))).astype(np.float32)
    start = np.repeat(x[:1], 4, axis=0)
    c, stats = kmeans(x, 4, niter=12, seed=0, init_centroids=start)
    assert stats["iterations"][0]["empty_split"] == 3
    assert np.isfinite(c).all()
    labels, _ = nearest(x, c)
    assert sorted(np.bincount(labels, minlength=4)) == [25, 25, 25, 25]  # one blob each
    assert stats["final_mse"] < 0.1


def test_residual_kmeans_layers_reduce_error():
    x = clustered(3000, 10, seed=6)
    books, stats = fit_residual_kmeans(x, [32, 16, 8], niter=8, seed=0)
    assert [b.shape for b in books] == [(32, 10), (16, 10), (8, 10)]
    enc = encode_batch(books, x)
    per_layer = enc.sq_residual.mean(0)
    assert per_layer[0] > per_layer[1] > per_layer[2]
    assert per_layer[2] < 0.5 * (x.astype(np.float64) ** 2).sum(1).mean()


def test_init_subset_is_seeded_and_bounded():
    x = clustered(5000, 4, seed=7)
    a = init_subset(x, 16, seed=3)
    assert len(a) == 8 * 16 + 1024
    assert np.array_equal(a, init_subset(x, 16, seed=3))
    assert len(init_subset(x[:100], 16, seed=3)) == 100


def _demo_embeddings() -> np.ndarray:
    import pyarrow.parquet as pq

    col = pq.read_table(DEMO, columns=["embedding"]).column(0).combine_chunks()
    return col.flatten().to_numpy().astype(np.float32).reshape(len(col), -1)


def test_residual_kmeans_mse_within_5pct_of_faiss_rq_on_demo():
    faiss = pytest.importorskip("faiss")
    x = _demo_embeddings()
    layers = [256, 256, 256]
    books, _ = fit_residual_kmeans(x, layers, niter=20, seed=0,
                                   init_points=init_subset(x, 256, seed=0))
    ours = float(encode_batch(books, x).qerr.astype(np.float64).mean())
    rq = faiss.ResidualQuantizer(x.shape[1], len(layers), 8)
    rq.train_type = 0  # plain greedy residual k-means (no progressive-dim training)
    rq.max_beam_size = 1
    rq.train(x)
    recon = rq.decode(rq.compute_codes(x))
    theirs = float(((x.astype(np.float64) - recon) ** 2).sum(1).mean())
    assert ours <= 1.05 * theirs, (ours, theirs)


def _residual_books(x: np.ndarray, layers, seed: int) -> list[np.ndarray]:
    """Codebooks of rows drawn (seeded) from the residual after the earlier layers."""
    rng = np.random.default_rng(seed)
    books, r = [], x.copy()
    for k in layers:
        cb = r[rng.choice(len(r), k, replace=False)].copy()
        books.append(cb)
        r = r - cb[nearest(r, cb)[0]]
    return books


def test_bf16_fast_path_keeps_nearly_all_codes_and_exact_errors():
    """bf16 ranking + fp32 re-rank of the 8 best: >= 99.9% of items get the exact path's
    codes, and every reported residual is the fp32 residual of the codes it chose."""
    x = clustered(20000, 64, clusters=48, seed=5)
    books = _residual_books(x, (256, 256, 256), seed=5)
    exact = encode_batch(books, x)
    fast = encode_batch(books, x, precision="bf16", rerank=8)
    same = (fast.codes == exact.codes).all(axis=1).mean()
    assert same >= 0.999, same
    recon = decode(books, fast.codes)
    np.testing.assert_allclose(fast.qerr, ((x - recon) ** 2).sum(1), rtol=1e-3, atol=1e-3)
    # a re-rank as wide as the codebook is the exact search again
    full = encode_batch(books[:1], x[:2000], precision="bf16", rerank=256)
    assert (full.codes == encode_batch(books[:1], x[:2000]).codes).mean() >= 0.999
    with pytest.raises(ValueError, match="precision"):
        encode_batch(books, x[:10], precision="fp8")


def test_bf16_re_rank_in_blocks_of_rows_gives_the_same_codes(monkeypatch):
    """The fast path's re-rank gathers its candidates' codewords a block of rows at a time
    (a whole chunk's gather, rows x rerank x d, outgrew a GPU's memory at a wide re-rank):
    blocks of 7 rows give the codes and errors of one block."""
    from semid_dist.quantize import torch_kernel

    x = clustered(3000, 32, clusters=24, seed=8)
    books = _residual_books(x, (64, 64), seed=8)
    whole = encode_batch(books, x, precision="bf16", rerank=16)
    monkeypatch.setattr(torch_kernel, "RERANK_BYTES", 4 * 16 * 32 * 7)
    blocks = encode_batch(books, x, precision="bf16", rerank=16)
    assert np.array_equal(blocks.codes, whole.codes)
    assert np.array_equal(blocks.qerr, whole.qerr)


def test_checked_argmin_restores_the_exact_codes_from_low_precision_scores():
    """Scores from bf16-rounded inputs pick another codeword than fp32 for some rows; the
    error-bound check scores exactly those rows again (and only a part of all rows), so every
    code is the exact fp32 one."""
    x = clustered(20000, 64, clusters=48, seed=6)
    cb = _residual_books(x, (256,), seed=6)[0]
    r, c = torch.from_numpy(x), torch.from_numpy(cb)
    c_sq = (c * c).sum(dim=1)

    def bf16_scores(rows: torch.Tensor) -> torch.Tensor:  # inputs rounded to bf16's unit
        return torch.addmm(c_sq.unsqueeze(0), rows.bfloat16().float(), c.bfloat16().float().T,
                           beta=1.0, alpha=-2.0)

    exact = torch_kernel.argmin_rows(r, c, c_sq).numpy()
    assert (bf16_scores(r).argmin(dim=1).numpy() != exact).sum() > 10  # the bf16 codes differ
    idx, again = torch_kernel.checked_argmin(r, c, c_sq, float(c_sq.max().sqrt()), bf16_scores,
                                            2.0 ** -8)
    assert np.array_equal(idx.numpy(), exact)
    assert 0 < again < len(x)


def test_tf32_precision_gives_the_exact_codes():
    """precision="tf32": a CPU's encode_batch runs the exact kernel; torch's path (a GPU's)
    scores from inputs it rounds to TF32 itself (so on a CPU too), which picks other codes
    for some rows, and re-scores in fp32 the rows within the bound: every code exact."""
    x = clustered(6000, 32, clusters=24, seed=8)
    books = _residual_books(x, (128, 64, 64), seed=8)
    exact = encode_batch(books, x)
    assert np.array_equal(encode_batch(books, x, precision="tf32").codes, exact.codes)
    tb = torch_kernel.TorchBooks(books, "cpu", "tf32")
    codes, sq = tb.encode_rows(torch.from_numpy(x))
    assert (codes.numpy() == exact.codes).all(axis=1).mean() >= 0.9999
    np.testing.assert_allclose(sq.numpy(), exact.sq_residual, rtol=1e-4, atol=1e-5)
    assert 0 < tb.rechecked < len(x) * len(books)
    r, c = torch.from_numpy(x), torch.from_numpy(books[0])
    c_sq = (c * c).sum(dim=1)
    rounded = torch.addmm(c_sq, torch_kernel.to_tf32(r), torch_kernel.to_tf32(c).T, alpha=-2.0)
    assert (rounded.argmin(dim=1).numpy() != exact.codes[:, 0]).any()  # TF32 alone errs


def test_to_tf32_rounds_to_ten_mantissa_bits():
    v = torch.tensor([1 + 2**-11, 1 + 2**-11 + 2**-13, -(1 + 2**-10 + 2**-12), 3.0, 0.0,
                      2 - 2**-12], dtype=torch.float32)
    expect = [1 + 2**-10, 1 + 2**-10, -(1 + 2**-10), 3.0, 0.0, 2.0]  # half away from zero
    assert torch_kernel.to_tf32(v).tolist() == expect
    x = torch.from_numpy(clustered(1000, 16, seed=2))
    t = torch_kernel.to_tf32(x)
    assert ((t - x).abs() <= x.abs() * 2**-11).all()
    assert (t.view(torch.int32) & 0x1FFF == 0).all()


def test_tf32_switch_sets_torchs_flag_inside_and_leaves_it_as_it_was():
    """Set by either of torch's calls (the fp32 matmul precision, or the CUDA TF32 flag
    alone, which torch >= 2.9 then refuses to read back as a precision), the state after a
    block is the state before: the same flag, the same precision where torch gives one."""
    saved = torch.get_float32_matmul_precision()
    flag = torch.backends.cuda.matmul.allow_tf32

    def state():
        return torch.backends.cuda.matmul.allow_tf32, torch_kernel._precision()

    try:
        setups = [lambda p=p: torch.set_float32_matmul_precision(p)
                  for p in ("highest", "high", "medium")]
        setups += [lambda v=v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)
                   for v in (True, False)]
        for setup in setups:
            for on in (False, True):
                setup()
                before = state()
                with torch_kernel.Tf32Switch(on):
                    assert torch.backends.cuda.matmul.allow_tf32 is on
                assert state() == before
    finally:
        torch.set_float32_matmul_precision(saved)
        torch.backends.cuda.matmul.allow_tf32 = flag
