"""The torch encode kernels: what a GPU runs (and a CPU for the bf16 fast path).

`TorchBooks` holds the codebooks on one device and encodes a chunk of rows there with no wait
for the device but the copy back (`encode_torch` copies each chunk in and its codes and norms
out once). The exact path scores in fp32 with TF32 off (`Tf32Switch`), whatever torch's
switch says. Two fast paths: "tf32" scores with TF32 on inputs it rounds to TF32 itself
(`to_tf32`) and scores again in fp32 every row within the scores' worst-case error
(`checked_argmin`): the exact codes but for fp32 near-ties; "bf16" ranks by a bf16 GEMM and
re-scores the `rerank` best in fp32 (`rerank_argmin`, >= 99.9% of the exact codes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch


def as_tensor(a: np.ndarray, device: str) -> torch.Tensor:
    """a as a float32 tensor on `device` (shares a's memory on a CPU when it can)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


def nearest_chunk(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x: (m, d) -> (labels (m,) int64, squared distances
    (m,) float32), on x's device (`nearest` on an accelerator; a CPU runs numpy's kernel)."""
    scores = torch.addmm(c_sq.unsqueeze(0), x, c.T, beta=1.0, alpha=-2.0)
    best, idx = torch.min(scores, dim=1)
    dist = torch.clamp_(best + (x * x).sum(dim=1), min=0.0)
    return idx, dist


def argmin_rows(r: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """r: (m, d), c: (k, d), c_sq: (k,) ||c||^2 -> (m,) int64, the nearest codeword of
    each row in exact fp32 (ties to the lowest code), on r's device."""
    return torch.addmm(c_sq.unsqueeze(0), r, c.T, beta=1.0, alpha=-2.0).argmin(dim=1)


def rerank_argmin(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, c_low: torch.Tensor,
                  rerank: int) -> torch.Tensor:
    """Fast path: rank all codewords by a low-precision GEMM (c_low: c in that dtype),
    re-score the `rerank` best in fp32 (TF32 off) and keep the nearest of those (ties to the
    lowest code, as the exact path). x: (m, d) -> (m,) int64."""
    approx = c_sq.unsqueeze(0) - 2.0 * (x.to(c_low.dtype) @ c_low.T).float()
    cand = torch.topk(approx, min(rerank, len(c)), dim=1, largest=False).indices
    cand, _ = torch.sort(cand, dim=1)
    del approx
    best = torch.empty(len(x), dtype=torch.int64, device=x.device)
    # the candidates' codewords gathered a block of rows at a time (rows x rerank x d fp32:
    # a chunk's whole gather took 42 GB at d = 768, 3 x 4096, rerank 1024)
    rows = max(1, RERANK_BYTES // (4 * cand.shape[1] * c.shape[1]))
    with Tf32Switch(False):
        for start in range(0, len(x), rows):
            part = cand[start:start + rows]
            exact = c_sq[part] - 2.0 * torch.bmm(c[part], x[start:start + rows].unsqueeze(2)
                                                 ).squeeze(2)
            best[start:start + rows] = part.gather(1, exact.argmin(dim=1, keepdim=True)
                                                   ).squeeze(1)
    return best


RERANK_BYTES = 256 * 2**20  # the fast path's gathered candidates, a block of rows at a time


LOW_PRECISION = {"bf16": torch.bfloat16}
PRECISIONS = ("fp32", "tf32", *LOW_PRECISION)
# TF32 keeps 10 explicit mantissa bits. The tf32 path rounds its inputs to TF32 itself
# (`to_tf32`, to nearest: within 2^-11 of each value), so the tensor cores take them exactly
# however they convert; their fp32 sums err by at most 2^-23 per addition (truncating).
TF32_UNIT = 2.0 ** -11
FP32_SUM_UNIT = 2.0 ** -23


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's values rounded to the nearest TF32 value (ties away from zero),
    same shape, still float32: the low 13 mantissa bits cleared after adding half of them.
    Finite normal inputs (subnormals round, but off the 2^-11 relative bound)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")


_tf32_lock = threading.RLock()


class Tf32Switch:
    """torch's TF32 switch for CUDA matrix products, set for the ops launched inside the
    block when it is not so already, and set back after as it was, by the same call
    (`torch.backends.cuda.matmul.allow_tf32`), or to "medium" by the call that sets that
    (`torch.set_float32_matmul_precision`, the one way to it). The switch is process-wide
    (read when an op is launched), so the blocks of all threads take turns; blocks do not
    nest here."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        _tf32_lock.acquire()
        try:
            self.was = torch.backends.cuda.matmul.allow_tf32
            self.medium = self.was != self.on and _precision() == "medium"
            if self.was != self.on:
                torch.backends.cuda.matmul.allow_tf32 = self.on
        except BaseException:
            _tf32_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.medium:
                torch.set_float32_matmul_precision("medium")
            elif self.was != self.on:
                torch.backends.cuda.matmul.allow_tf32 = self.was
        finally:
            _tf32_lock.release()


def _precision() -> str | None:
    """torch's fp32 matmul precision, or None where torch will not say (torch >= 2.9 refuses
    while its backends' settings disagree, as after `allow_tf32` was set alone)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def checked_argmin(r: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, c_norm_max: float,
                   approx: Callable[[torch.Tensor], torch.Tensor],
                   unit: float) -> tuple[torch.Tensor, int]:
    """The exact fp32 argmin, from cheaper scores checked against their error bound.

    `approx(rows)` scores every codeword, ||c||^2 - 2 r.c, from inputs rounded to within
    `unit` of themselves (TF32's 2^-11, or bf16's 2^-8) with fp32 sums. Each such score is
    within e = 2 (2u + u^2 + d 2^-23) ||r|| max||c|| (+ the fp32 additions' share) of the
    exact one, so where a row's best approximate score beats its second best by more than
    2e the exact argmin is the same codeword; the other rows are scored again in exact fp32
    (the rows the exact path itself may tie-break otherwise are fp32 near-ties). The
    threshold takes 1% more than 2e for the terms the bound leaves out (second order: the
    rounding of the norms and of the bound itself). r: (m, d), c: (k, d), c_sq: (k,),
    c_norm_max = max ||c|| -> (codes (m,) int64, rows scored again)."""
    scores = approx(r)
    best, idx = scores.min(dim=1)
    scores.scatter_(1, idx.unsqueeze(1), float("inf"))
    second = scores.min(dim=1).values
    del scores
    r_norm = torch.linalg.vector_norm(r, dim=1)
    dot_err = (2.0 * (2.0 * unit + unit * unit + r.shape[1] * FP32_SUM_UNIT)
               * r_norm * c_norm_max)
    add_err = 2.0 * FP32_SUM_UNIT * (c_norm_max * c_norm_max + 2.0 * r_norm * c_norm_max)
    rows = torch.nonzero(second - best <= 2.02 * (dot_err + add_err)).squeeze(1)
    if len(rows):
        with Tf32Switch(False):
            idx[rows] = argmin_rows(r[rows], c, c_sq)
    return idx, len(rows)


class TorchBooks:
    """Codebooks on one torch device, ready for `encode_rows`: fp32, their squared norms,
    their largest norm and, for the fast paths, a copy rounded to bf16 or to TF32.
    `rechecked` counts the rows the tf32 path scored again in fp32."""

    def __init__(self, codebooks: list[np.ndarray], device: str, precision: str = "fp32",
                 rerank: int = 8) -> None:
        check_precision(precision)
        self.precision, self.rerank, self.rechecked = precision, rerank, 0
        self.books = [as_tensor(cb, device) for cb in codebooks]
        self.sq = [(cb * cb).sum(dim=1) for cb in self.books]
        if precision in LOW_PRECISION:
            self.low = [cb.to(LOW_PRECISION[precision]) for cb in self.books]
        elif precision == "tf32":
            self.low = [to_tf32(cb) for cb in self.books]
        else:
            self.low = [None] * len(self.books)
        self.norm_max = [float(torch.sqrt(sq.max())) for sq in self.sq]

    def _codes(self, layer: int, r: torch.Tensor) -> torch.Tensor:
        cb, cb_sq = self.books[layer], self.sq[layer]
        if self.precision == "fp32":
            with Tf32Switch(False):
                return argmin_rows(r, cb, cb_sq)
        if self.precision == "tf32":
            cb_tf32 = self.low[layer]

            def approx(rows: torch.Tensor) -> torch.Tensor:
                with Tf32Switch(True):
                    return torch.addmm(cb_sq.unsqueeze(0), to_tf32(rows), cb_tf32.T, beta=1.0,
                                       alpha=-2.0)

            idx, again = checked_argmin(r, cb, cb_sq, self.norm_max[layer], approx, TF32_UNIT)
            self.rechecked += again
            return idx
        return rerank_argmin(r, cb, cb_sq, self.low[layer], self.rerank)

    def encode_rows(self, r: torch.Tensor, candidates: int = 0) -> tuple[torch.Tensor, ...]:
        """Greedy residual encode of one chunk, r: (m, d) float32 on the books' device (left
        as it is). Returns tensors on that device, with no wait for it (but the tf32 path's,
        one a layer): codes (m, L) int32, squared residual norms (m, L) float32 and, with
        `candidates` > 0, the `candidates` best last-layer codes (m, C) and their errors."""
        n_layers = len(self.books)
        codes = torch.empty((len(r), n_layers), dtype=torch.int32, device=r.device)
        sq = torch.empty((len(r), n_layers), dtype=torch.float32, device=r.device)
        alt: tuple[torch.Tensor, ...] = ()
        with torch.no_grad():
            for layer, cb in enumerate(self.books):
                if candidates and layer == n_layers - 1:
                    with Tf32Switch(False):
                        alt = top_candidates(r, cb, self.sq[layer], candidates)
                idx = self._codes(layer, r)
                r = r - cb[idx]
                codes[:, layer] = idx
                sq[:, layer] = torch.linalg.vector_norm(r, dim=1).square_()
        return (codes, sq, *alt)


def encode_torch(codebooks: list[np.ndarray], x: np.ndarray, chunk_rows: int, device: str,
                 precision: str, rerank: int, codes: np.ndarray, sq_res: np.ndarray,
                 alt_codes: np.ndarray | None, alt_err: np.ndarray | None) -> None:
    """`encode_batch` on torch (an accelerator, or the bf16 fast path), into the outputs:
    one copy in and one copy back per chunk."""
    books = TorchBooks(codebooks, device, precision, rerank)
    n_alt = 0 if alt_codes is None else alt_codes.shape[1]
    for start in range(0, len(x), chunk_rows):
        r = as_tensor(x[start:start + chunk_rows], device)
        out = [t.cpu().numpy() for t in books.encode_rows(r, n_alt)]
        stop = start + len(r)
        codes[start:stop], sq_res[start:stop] = out[0], out[1]
        if n_alt:
            alt_codes[start:stop], alt_err[start:stop] = out[2], out[3]


def top_candidates(r: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.addmm(c_sq.unsqueeze(0), r, c.T, beta=1.0, alpha=-2.0)
    vals, idx = torch.topk(scores, k, dim=1, largest=False, sorted=True)
    return (idx.to(torch.int32),
            torch.clamp(vals + (r * r).sum(dim=1, keepdim=True), min=0.0))


