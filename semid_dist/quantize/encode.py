"""Batched fp32 nearest-codeword kernels: the one batch function every engine calls.

Distances use ||c||^2 - 2 x.c (the ||x||^2 term does not change the argmin), computed by
one GEMM per row chunk so memory stays bounded at `chunk_rows * k` floats (on a CPU the chunk
is also kept small enough for the score tile to stay in cache, see `tile_rows`). Ties go to the
lowest code. On a CPU the sgemm is torch's MKL (numpy's OpenBLAS on AMD's CPUs, where it is
the faster: `cpu_blas.mkl_is_faster`), with ||c||^2 folded in as one more row of the
codebook operand against a column of ones on the rows (`_CpuBook`, `_Rows`: no pass over the
score tile to add it), and the argmin is numpy's (5-14x faster than torch.min). With several
threads (torch's thread count, see `cpu_blas.set_cpu_threads`) the chunks are split into one
block per thread, each running the whole kernel with MKL at one thread (set per thread:
`cpu_blas.row_parallel`): the argmin and residual updates then run in parallel too. Against
the same blocks on numpy's OpenBLAS sgemm with a separate offset pass this is 1.31x at d=128
with 4096-entry codebooks and 1.04-1.10x at d=128 3 x 256 and d=768, with the same codes on
random data. Every chunk is the same one-thread sgemm whatever the thread count, so the
results do not depend on it; where torch has no MKL, or its fp32 matmul precision is lowered
(`cpu_blas.torch_gemm_is_exact`), numpy's BLAS multiplies the same operands too. A GPU runs
`torch_kernel` (as does a CPU for the bf16 fast path), each chunk filling GPU_TILE_BYTES; its
exact path runs with TF32 off whatever torch's switch says (a GPU's fp32 codes differ from
the CPU's only on fp32 near-ties), and its opt-in fast paths are "tf32" (the exact codes, by
a check) and "bf16".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semid_dist.quantize.cpu_blas import (
    mkl_is_faster,
    mkl_local_threads,
    row_parallel,
    torch_gemm_is_exact,
)
from semid_dist.quantize.torch_kernel import (
    Tf32Switch,
    as_tensor,
    check_precision,
    encode_torch,
    nearest_chunk,
)


@dataclass(frozen=True)
class EncodeResult:
    """codes: (n, L) int32; sq_residual: (n, L) float32, ||r_l||^2 after each layer;
    alt_codes / alt_err: (n, C) the C best last-layer codes (column 0 = the chosen one) and the
    squared reconstruction error each would give (None unless candidates > 1)."""

    codes: np.ndarray
    sq_residual: np.ndarray
    alt_codes: np.ndarray | None = None
    alt_err: np.ndarray | None = None

    @property
    def qerr(self) -> np.ndarray:
        """(n,) float32 squared reconstruction error ||x - decode(codes)||^2."""
        return self.sq_residual[:, -1]


# Bytes of one row chunk's score matrix (rows x k) plus its rows (rows x d), fp32, on a CPU.
# Past a few MiB the scores stop fitting in cache and, past glibc's mmap threshold, are
# page-faulted in afresh on every call: at k=4096 an 8,192-row chunk was 1.6-2.5x slower
# per row than a 16 MiB tile; at k=256 a 4 MiB tile (2,688 rows at d=128) beat 16 MiB by
# 1.0-1.4x, and 512 rows keep the GEMM efficient at k=4096 (docs/BENCHMARKS.md).
CPU_TILE_BYTES = 4 * 2**20
CPU_TILE_MIN_ROWS = 512
# A GPU's chunk: each runs ~10 kernels a layer and one copy back, so it must hold enough
# rows to keep their launches small against the GEMM (8,192 rows of d=128 at 3 x 256 are
# ~2 GFLOP, tens of microseconds on a datacenter GPU): 174,080 rows there, 13,312 at d=768
# with 4096-entry codebooks.
GPU_TILE_BYTES = 256 * 2**20


def _on_cpu(device: str) -> bool:
    return str(device).startswith("cpu")


def tile_rows(chunk_rows: int, k: int, d: int, device: str = "cpu") -> int:
    """Rows per GEMM. On a CPU: `chunk_rows`, lowered so the fp32 tile of scores and rows
    stays within CPU_TILE_BYTES (a multiple of 128, at least CPU_TILE_MIN_ROWS). On a GPU:
    the rows whose tile fills GPU_TILE_BYTES (a multiple of 1,024, at least 1,024), whatever
    `chunk_rows`. Depends only on the configuration, the codebook shape and the device kind,
    so every engine chunks alike."""
    if not _on_cpu(device):
        return max(1024, GPU_TILE_BYTES // (4 * (k + d)) // 1024 * 1024)
    fit = CPU_TILE_BYTES // (4 * (k + d)) // 128 * 128
    return max(1, min(chunk_rows, max(CPU_TILE_MIN_ROWS, fit)))


def _aligned(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array on torch's allocator (64-byte aligned), so the sgemm's
    operands sit alike in every process."""
    return torch.empty(shape, dtype=torch.float32).numpy()


@dataclass(frozen=True)
class _CpuBook:
    """One codebook ready for the CPU kernel: c (k, d) and the GEMM operand
    aug = [-2 c^T; ||c||^2] (d + 1, k). Rows carrying a last column of ones (`_Rows`) times
    aug give ||c||^2 - 2 x.c in one sgemm, with no pass over the score tile to add the
    offsets (scaling by -2 is exact). aug_t: the same memory as a torch tensor when the
    products go through torch's MKL, None when numpy's BLAS makes them (no MKL, a lowered
    torch precision, or a CPU where MKL is the slower: `cpu_blas.mkl_is_faster`); decided once per
    book, so every chunk of a call multiplies alike (`_gemm`)."""

    c: np.ndarray
    aug: np.ndarray
    aug_t: torch.Tensor | None

    @classmethod
    def of(cls, c: np.ndarray) -> _CpuBook:
        c = np.ascontiguousarray(c, dtype=np.float32)
        aug = _aligned((c.shape[1] + 1, len(c)))
        np.multiply(c.T, -2.0, out=aug[:-1])
        aug[-1] = np.einsum("ij,ij->i", c, c)
        mkl = (mkl_local_threads() is not None and torch_gemm_is_exact()
               and mkl_is_faster())
        return cls(c=c, aug=aug, aug_t=torch.from_numpy(aug) if mkl else None)


class _Rows:
    """A reused (rows, d + 1) float32 buffer whose last column is 1: `rows(m)` is the
    (m, d) view to fill or update, `augmented(m)` the (m, d + 1) GEMM operand."""

    def __init__(self, rows: int, d: int) -> None:
        self.buf = _aligned((rows, d + 1))
        self.buf[:, d] = 1.0
        self.d = d

    def rows(self, m: int) -> np.ndarray:
        return self.buf[:m, :self.d]

    def augmented(self, m: int) -> np.ndarray:
        return self.buf[:m]


def _gemm(a: np.ndarray, book: _CpuBook, out: np.ndarray) -> None:
    """out (m, k) = a (m, d + 1) @ book.aug: torch's MKL sgemm (1.1-1.2x numpy's OpenBLAS at
    K = d on two busy cores), or numpy's BLAS (see `_CpuBook`)."""
    if book.aug_t is not None:
        torch.matmul(torch.from_numpy(a), book.aug_t, out=torch.from_numpy(out))
    else:
        np.matmul(a, book.aug, out=out)


def _scores_cpu(xa: np.ndarray, book: _CpuBook, scores: np.ndarray) -> np.ndarray:
    """xa (m, d + 1) C-contiguous float32 rows with a last column of ones (`_Rows`); scores:
    a reused flat float32 buffer of >= m * k -> (m, k) view of it holding
    ||c||^2 - 2 x.c (one sgemm)."""
    m, k = len(xa), len(book.c)
    s = scores[:m * k].reshape(m, k)
    _gemm(xa, book, s)
    return s


def _argmin_cpu(xa: np.ndarray, book: _CpuBook, scores: np.ndarray) -> tuple[
        np.ndarray, np.ndarray]:
    """xa: (m, d + 1) rows with a last column of ones -> (labels (m,) int64, their scores
    ||c||^2 - 2 x.c (m,) float32), see `_scores_cpu`. numpy's argmin takes the first
    minimum."""
    s = _scores_cpu(xa, book, scores)
    idx = s.argmin(axis=1)
    return idx, np.take_along_axis(s, idx[:, None], axis=1).ravel()


def _top_candidates_cpu(ra: np.ndarray, book: _CpuBook, scores: np.ndarray,
                        codes_out: np.ndarray, err_out: np.ndarray) -> None:
    """The C = codes_out.shape[1] nearest codewords of each row r of ra = [r, 1] (m, d + 1),
    ascending by squared error (equal errors in code order), and those errors, on the CPU
    kernel. Which of several codes tied at the C-th place is kept is unspecified but fixed
    for given input."""
    m, k, c = len(ra), len(book.c), codes_out.shape[1]
    r = ra[:, :-1]
    s = _scores_cpu(ra, book, scores)
    cand = np.argpartition(s, c - 1, axis=1)[:, :c] if c < k else np.tile(np.arange(k), (m, 1))
    vals = np.take_along_axis(s, cand, axis=1)
    order = np.lexsort((cand, vals), axis=-1)
    codes_out[:] = np.take_along_axis(cand, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    vals += np.einsum("ij,ij->i", r, r)[:, None]
    np.maximum(vals, 0.0, out=err_out)


def nearest(x: np.ndarray, centroids: np.ndarray, *, chunk_rows: int = 8192,
            device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row.

    x: (n, d) float32 (other float dtypes are converted chunk by chunk); centroids: (k, d)
    float32 -> (labels (n,) int64, sq_dist (n,) float32).
    """
    chunk_rows = tile_rows(chunk_rows, *centroids.shape, device)
    labels = np.empty(len(x), dtype=np.int64)
    dists = np.empty(len(x), dtype=np.float32)
    if _on_cpu(device):
        book = _CpuBook.of(centroids)

        def block(rows: slice) -> None:
            part = x[rows]
            tile = min(chunk_rows, len(part))
            scores = _aligned((tile * len(centroids),))
            buf = _Rows(tile, x.shape[1])
            for start in range(0, len(part), chunk_rows):
                m = min(chunk_rows, len(part) - start)
                xb = buf.rows(m)
                xb[...] = part[start:start + m]
                idx, best = _argmin_cpu(buf.augmented(m), book, scores)
                best += np.einsum("ij,ij->i", xb, xb)
                at = rows.start + start
                labels[at:at + len(xb)] = idx
                dists[at:at + len(xb)] = np.maximum(best, 0.0, out=best)

        row_parallel(block, len(x), chunk_rows, torch.get_num_threads())
        return labels, dists
    c = as_tensor(centroids, device)
    c_sq = (c * c).sum(dim=1)
    with torch.no_grad():
        for start in range(0, len(x), chunk_rows):
            xb = as_tensor(x[start:start + chunk_rows], device)
            with Tf32Switch(False):
                idx, dist = nearest_chunk(xb, c, c_sq)
            labels[start:start + len(xb)] = idx.cpu().numpy()
            dists[start:start + len(xb)] = dist.cpu().numpy()
    return labels, dists


def encode_batch(codebooks: list[np.ndarray], x: np.ndarray, *, chunk_rows: int = 8192,
                 device: str = "cpu", candidates: int = 1, precision: str = "fp32",
                 rerank: int = 8) -> EncodeResult:
    """Greedy residual encode.

    precision "fp32" scores exactly; "tf32" (for a GPU; a CPU runs fp32) scores by a TF32
    GEMM and scores again in fp32 every row whose best two codewords are closer than TF32's
    error bound (`torch_kernel.checked_argmin`): the exact path's codes but for fp32
    near-ties; "bf16" ranks the codewords by a bf16 GEMM and re-scores the `rerank` best in
    fp32 (`torch_kernel.rerank_argmin`).

    codebooks: L arrays (k_l, d) float32; x: (n, d) float32 -> EncodeResult with
    codes (n, L) int32 and squared residual norms (n, L) float32; with candidates C > 1 also
    the C best last-layer codes and their errors (for capacity-bounded collisions).
    """
    n, n_layers = len(x), len(codebooks)
    codes = np.empty((n, n_layers), dtype=np.int32)
    sq_res = np.empty((n, n_layers), dtype=np.float32)
    n_alt = min(candidates, len(codebooks[-1]))
    alt_codes = np.empty((n, n_alt), dtype=np.int32) if n_alt > 1 else None
    alt_err = np.empty((n, n_alt), dtype=np.float32) if n_alt > 1 else None
    check_precision(precision)
    chunk_rows = tile_rows(chunk_rows, max(len(cb) for cb in codebooks), x.shape[1], device)
    if _on_cpu(device) and precision in ("fp32", "tf32"):  # no TF32 on a CPU: tf32 is exact
        _encode_cpu(codebooks, x, chunk_rows, codes, sq_res, alt_codes, alt_err)
    else:
        encode_torch(codebooks, x, chunk_rows, device, precision, rerank, codes, sq_res,
                     alt_codes, alt_err)
    if alt_codes is not None:  # column 0 is exactly the greedy choice, even on ties
        alt_codes[:, 0] = codes[:, -1]
        alt_err[:, 0] = sq_res[:, -1]
    return EncodeResult(codes=codes, sq_residual=sq_res, alt_codes=alt_codes, alt_err=alt_err)


def _encode_cpu(codebooks: list[np.ndarray], x: np.ndarray, chunk_rows: int,
                codes: np.ndarray, sq_res: np.ndarray, alt_codes: np.ndarray | None,
                alt_err: np.ndarray | None) -> None:
    """`encode_batch` on the CPU kernel, into the given outputs, one row block per thread:
    each block reuses one residual buffer and one score tile for all its chunks (no fresh
    pages)."""
    books = [_CpuBook.of(cb) for cb in codebooks]
    last = len(books) - 1

    def block(part: slice) -> None:
        rows = min(chunk_rows, part.stop - part.start)
        scores = _aligned((rows * max(len(b.c) for b in books),))
        buf = _Rows(rows, x.shape[1])
        for start in range(part.start, part.stop, chunk_rows):
            stop = min(start + chunk_rows, part.stop)
            r, ra = buf.rows(stop - start), buf.augmented(stop - start)
            r[...] = x[start:stop]
            for layer, book in enumerate(books):
                if alt_codes is not None and layer == last:
                    _top_candidates_cpu(ra, book, scores, alt_codes[start:stop],
                                        alt_err[start:stop])
                idx, _ = _argmin_cpu(ra, book, scores)
                r -= book.c[idx]
                codes[start:stop, layer] = idx
                sq_res[start:stop, layer] = np.einsum("ij,ij->i", r, r)

    row_parallel(block, len(x), chunk_rows, torch.get_num_threads())


def decode(codebooks: list[np.ndarray], codes: np.ndarray) -> np.ndarray:
    """codes: (n, L) integer -> reconstruction (n, d) float32 (sum of the chosen codewords)."""
    out = np.zeros((len(codes), codebooks[0].shape[1]), dtype=np.float32)
    for layer, cb in enumerate(codebooks):
        out += cb[codes[:, layer]]
    return out
