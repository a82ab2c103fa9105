"""GPU path: the exact fp32 kernels give the CPU's codes, the bf16 fast path nearly all of them.
Skipped without a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semid_dist.quantize import encode_batch, fit_residual_kmeans, nearest
from tests.conftest import clustered

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_encode_on_gpu_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    x = clustered(20000, 64, seed=1)
    books = [clustered(k, 64, seed=k) for k in (256, 256, 256)]
    cpu = encode_batch(books, x, chunk_rows=4096)
    gpu = encode_batch(books, x, chunk_rows=4096, device="cuda")
    assert (cpu.codes == gpu.codes).mean() >= 0.9999
    np.testing.assert_allclose(cpu.qerr, gpu.qerr, rtol=1e-3, atol=1e-3)


def test_kmeans_fit_on_gpu_matches_cpu_quality():
    x = clustered(8000, 32, seed=2)
    cpu, _ = fit_residual_kmeans(x, [64, 32], niter=8, seed=0)
    gpu, _ = fit_residual_kmeans(x, [64, 32], niter=8, seed=0, device="cuda")
    err = [float(encode_batch(b, x).qerr.mean()) for b in (cpu, gpu)]
    assert err[1] == pytest.approx(err[0], rel=1e-3)
    labels_cpu, _ = nearest(x, cpu[0])
    labels_gpu, _ = nearest(x, cpu[0], device="cuda")
    assert (labels_cpu == labels_gpu).mean() >= 0.9999


def test_bf16_fast_path_on_gpu_keeps_nearly_all_codes():
    torch.backends.cuda.matmul.allow_tf32 = False
    x = clustered(20000, 64, seed=3)
    books = [clustered(k, 64, seed=10 + k) for k in (256, 256, 256)]
    exact = encode_batch(books, x, chunk_rows=4096)
    fast = encode_batch(books, x, chunk_rows=4096, device="cuda", precision="bf16")
    assert (exact.codes == fast.codes).all(axis=1).mean() >= 0.999
