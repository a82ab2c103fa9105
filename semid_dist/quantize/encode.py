"""Batched fp32 nearest-codeword kernels: the one batch function every engine calls.

Distances use ||c||^2 - 2 x.c (the ||x||^2 term does not change the argmin), computed by
one GEMM per row chunk so memory stays bounded at `chunk_rows * k` floats. Ties go to the
lowest code. TF32 is never enabled here, so CPU and GPU give identical codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def _as_tensor(a: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


def _nearest_chunk(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    scores = torch.addmm(c_sq.unsqueeze(0), x, c.T, beta=1.0, alpha=-2.0)
    best, idx = torch.min(scores, dim=1)
    dist = torch.clamp_(best + (x * x).sum(dim=1), min=0.0)
    return idx, dist


def nearest(x: np.ndarray, centroids: np.ndarray, *, chunk_rows: int = 8192,
            device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row.

    x: (n, d) float32; centroids: (k, d) float32 -> (labels (n,) int64, sq_dist (n,) float32).
    """
    c = _as_tensor(centroids, device)
    c_sq = (c * c).sum(dim=1)
    labels = np.empty(len(x), dtype=np.int64)
    dists = np.empty(len(x), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(x), chunk_rows):
            xb = _as_tensor(x[start:start + chunk_rows], device)
            idx, dist = _nearest_chunk(xb, c, c_sq)
            labels[start:start + len(xb)] = idx.cpu().numpy()
            dists[start:start + len(xb)] = dist.cpu().numpy()
    return labels, dists


def encode_batch(codebooks: list[np.ndarray], x: np.ndarray, *, chunk_rows: int = 8192,
                 device: str = "cpu", candidates: int = 1) -> EncodeResult:
    """Greedy residual encode.

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
    books = [_as_tensor(cb, device) for cb in codebooks]
    books_sq = [(cb * cb).sum(dim=1) for cb in books]
    with torch.no_grad():
        for start in range(0, n, chunk_rows):
            r = _as_tensor(x[start:start + chunk_rows], device).clone()
            stop = start + len(r)
            for layer, (cb, cb_sq) in enumerate(zip(books, books_sq)):
                if alt_codes is not None and layer == n_layers - 1:
                    _top_candidates(r, cb, cb_sq, n_alt, alt_codes[start:stop],
                                    alt_err[start:stop])
                idx, dist = _nearest_chunk(r, cb, cb_sq)
                r -= cb[idx]
                codes[start:stop, layer] = idx.cpu().numpy()
                sq_res[start:stop, layer] = (r * r).sum(dim=1).cpu().numpy()
    if alt_codes is not None:  # column 0 is exactly the greedy choice, even on ties
        alt_codes[:, 0] = codes[:, -1]
        alt_err[:, 0] = sq_res[:, -1]
    return EncodeResult(codes=codes, sq_residual=sq_res, alt_codes=alt_codes, alt_err=alt_err)


def _top_candidates(r: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, k: int,
                    codes_out: np.ndarray, err_out: np.ndarray) -> None:
    scores = torch.addmm(c_sq.unsqueeze(0), r, c.T, beta=1.0, alpha=-2.0)
    vals, idx = torch.topk(scores, k, dim=1, largest=False, sorted=True)
    codes_out[:] = idx.cpu().numpy()
    err_out[:] = torch.clamp(vals + (r * r).sum(dim=1, keepdim=True), min=0.0).cpu().numpy()


def decode(codebooks: list[np.ndarray], codes: np.ndarray) -> np.ndarray:
    """codes: (n, L) integer -> reconstruction (n, d) float32 (sum of the chosen codewords)."""
    out = np.zeros((len(codes), codebooks[0].shape[1]), dtype=np.float32)
    for layer, cb in enumerate(codebooks):
        out += cb[codes[:, layer]]
    return out
