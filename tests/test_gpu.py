"""GPU path: the exact fp32 kernels give the CPU's codes, the bf16 fast path nearly all of them.
Skipped without a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semid_dist.bench import gpu as gpu_bench
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from semid_dist.quantize import encode_batch, fit_residual_kmeans, nearest
from semid_dist.quantize.torch_kernel import Tf32Switch, TorchBooks, to_tf32
from tests.conftest import clustered, small_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_encode_on_gpu_matches_cpu():
    """Also with torch's TF32 switch left on: the exact path turns it off for its GEMMs."""
    x = clustered(20000, 64, seed=1)
    books = [clustered(k, 64, seed=k) for k in (256, 256, 256)]
    cpu = encode_batch(books, x, chunk_rows=4096)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gpu = encode_batch(books, x, chunk_rows=4096, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert (cpu.codes == gpu.codes).all(axis=1).mean() >= 0.9999  # (items, not tokens)
    np.testing.assert_allclose(cpu.qerr, gpu.qerr, rtol=1e-3, atol=1e-3)


def test_tf32_fast_path_on_gpu_gives_the_exact_codes():
    """TF32 scores alone pick other codes for some rows; the check re-scores those rows."""
    x = clustered(50000, 128, seed=4)
    books = [clustered(k, 128, seed=20 + i) for i, k in enumerate((1024, 256, 256))]
    exact = encode_batch(books, x, device="cuda")
    fast = encode_batch(books, x, device="cuda", precision="tf32")
    assert (exact.codes == fast.codes).all(axis=1).mean() >= 0.9999
    np.testing.assert_allclose(exact.qerr, fast.qerr, rtol=1e-4, atol=1e-4)
    tb = TorchBooks(books, "cuda", "tf32")
    tb.encode_rows(torch.from_numpy(x).cuda())
    assert 0 < tb.rechecked < len(x) * len(books)
    r = torch.from_numpy(x).cuda()
    with Tf32Switch(True):
        alone = torch.addmm(tb.sq[0], to_tf32(r), tb.low[0].T, alpha=-2.0).argmin(dim=1)
    assert (alone.cpu().numpy() != exact.codes[:, 0]).any()


def test_kmeans_fit_on_gpu_matches_cpu_quality():
    x = clustered(8000, 32, seed=2)
    cpu, _ = fit_residual_kmeans(x, [64, 32], niter=8, seed=0)
    gpu, _ = fit_residual_kmeans(x, [64, 32], niter=8, seed=0, device="cuda")
    err = [float(encode_batch(b, x).qerr.mean()) for b in (cpu, gpu)]
    assert err[1] == pytest.approx(err[0], rel=1e-3)
    labels_cpu, _ = nearest(x, cpu[0])
    labels_gpu, _ = nearest(x, cpu[0], device="cuda")
    assert (labels_cpu == labels_gpu).mean() >= 0.9999


def test_bf16_fast_path_on_gpu_keeps_nearly_all_codes(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # (restored after)
    x = clustered(20000, 64, seed=3)
    books = [clustered(k, 64, seed=10 + k) for k in (256, 256, 256)]
    exact = encode_batch(books, x, chunk_rows=4096)
    fast = encode_batch(books, x, chunk_rows=4096, device="cuda", precision="bf16")
    assert (exact.codes == fast.codes).all(axis=1).mean() >= 0.999


def test_local_build_encoding_on_gpu_writes_the_cpu_builds_sids(small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    cpu = build(small_config(catalog, root), log=lambda msg: None)
    gpu = build(small_config(catalog, root, encode__use_gpu=True,
                             encode__from_version=cpu.version_id), log=lambda msg: None)
    store = TableStore(root, "sids")
    a = store.read_data(cpu.version_id).sort_by("item_id")
    b = store.read_data(gpu.version_id).sort_by("item_id")
    assert a.num_rows == b.num_rows == 2400
    same = np.array([p == q for p, q in zip(a["sid"].to_pylist(), b["sid"].to_pylist())])
    assert same.mean() >= 0.999  # items whose whole SID is the same (fp32 near-ties may flip)


def test_gpu_benchmark_section_on_the_card():
    rates = gpu_bench.gemm_rates(size=2048, repeats=3)
    assert min(rates[f"{kind}_tflops"] for kind in ("fp32", "tf32", "bf16")) > 0
    res = gpu_bench.bench_gpu_encode(64, (256, 256, 256), rates, rows=200_000, rounds=2)
    assert res["agreement_cpu"] >= 0.9999 and res["fast"]["identical"] >= 0.999
    assert res["tf32"]["identical"] >= 0.9999 and 0 < res["tf32"]["rechecked"] < 1


def test_local_build_fitting_on_gpu_fits_as_well_as_on_the_cpu(small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    cpu = build(small_config(catalog, root), log=lambda msg: None)
    gpu = build(small_config(catalog, root, fit__use_gpu=True), log=lambda msg: None)
    assert gpu.metrics["reconstruction"]["mse"] == pytest.approx(
        cpu.metrics["reconstruction"]["mse"], rel=1e-2)
