"""Row sums grouped by an index, in float64, on one torch thread: the sums behind k-means'
centroids (`group_sum`) and the shard statistics' per-prefix unit-vector sums
(`unit_group_sum`, `codes.partials`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def group_sum(index: np.ndarray, values: np.ndarray, rows: int, *,
              take: np.ndarray | None = None, chunk_rows: int = 4096,
              scale: float | None = None) -> np.ndarray:
    """Row sums grouped by `index`, accumulated in float64 in row order (so deterministic).

    index: (n,) int in [0, rows); values: (n, d) float32/float64 -> (rows, d) float64.
    scale: a power of two (`exact_scale`): each value times `scale` is rounded to an integer
    before it is added, so every sum is an exact integer (in float64, below 2^53) whatever
    the order or grouping of its terms: sums of the rows split over workers, then added,
    equal the sums of all the rows in one process, bit for bit.
    Converts `chunk_rows` rows at a time into one reused float64 buffer (small enough to
    stay in cache), so no float64 copy of all of `values` is made and no fresh pages are
    touched. take: optional (n,) int row numbers into a larger `values`: row i of the sum is
    values[take[i]], gathered chunk by chunk (a subset of the rows is summed without a copy).

    Runs torch on one thread (the calling thread's count, restored after). The sum is bound
    by memory, and torch's OpenMP regions are slow off the main thread: once a second thread
    team exists (a Ray Train worker runs the fit in a training thread), libgomp stops
    spinning and every region pays futex wake-ups, 10x this sum's time on 2 cores.
    """
    return one_torch_thread(_group_sum_rows, index, values, rows, take, chunk_rows, None,
                            scale)


def exact_scale(max_abs: float, n: int) -> float:
    """The power of two that makes `group_sum` of up to `n` rows, no value above `max_abs`
    in size, exact: each scaled value rounds to an integer of at most 2^(53 - b) in size
    (n < 2^b), so no sum of n of them leaves float64's integers. The rounding moves a
    value by at most `max_abs` x 2^(b - 53) (2^-33 of the largest value for a million
    rows; float32's own rounding is 2^-24 of a value)."""
    exponent = math.frexp(max_abs)[1]  # max_abs < 2^exponent (0 for 0)
    return math.ldexp(1.0, 53 - max(n, 1).bit_length() - exponent)


def unit_group_sum(index: np.ndarray, values: np.ndarray, rows: int, *,
                   take: np.ndarray | None = None, chunk_rows: int = 4096
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`group_sum` of the rows scaled to unit length, and each row's squared length, in one
    pass over `values` -> ((rows, d) float64 sums, (n,) float64 squared lengths of the rows
    summed: ||values[i]||^2, or ||values[take[i]]||^2 with `take`). take and chunk_rows, and
    the one torch thread, as `group_sum`.

    A row's squared length is the float64 einsum of its float64 copy (numpy's, bit for bit:
    `np.einsum("ij,ij->i", v, v, dtype=np.float64)` for rows of up to 8,192 values, past
    that einsum splits a row's sum), its factor 1 / sqrt of that; a row of length 0 (no
    direction) adds zeros, which leave every sum as it was. One pass instead of a pass for
    the lengths and one for the sums: a 65,536 x 128 shard's statistics took 4 ms less."""
    sq_norms = np.empty(len(index), dtype=np.float64)
    sums = one_torch_thread(_group_sum_rows, index, values, rows, take, chunk_rows, sq_norms,
                            None)
    return sums, sq_norms


def one_torch_thread(fn: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
    """fn(*args) with torch on one thread (the calling thread's count restored after); see
    `group_sum` for why."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _group_sum_rows(index: np.ndarray, values: np.ndarray, rows: int,
                    take: np.ndarray | None, chunk_rows: int,
                    sq_norms: np.ndarray | None, scale: float | None) -> np.ndarray:
    """`group_sum`; with `sq_norms` (n,) float64 it is filled with the rows' squared lengths
    and the rows are summed as unit vectors (`unit_group_sum`); with `scale`, the rows
    scaled and rounded to integers (exact sums)."""
    out = torch.zeros((rows,) + values.shape[1:], dtype=torch.float64)
    idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
    src = torch.from_numpy(np.ascontiguousarray(values))
    picks = None if take is None else torch.from_numpy(np.ascontiguousarray(take, np.int64))
    size = (min(chunk_rows, len(idx)),) + values.shape[1:]
    buf = torch.empty(size, dtype=torch.float64)
    gathered = None if picks is None else torch.empty(size, dtype=src.dtype)
    factor = np.empty(size[0], dtype=np.float64)
    for start in range(0, len(idx), chunk_rows):
        stop = min(start + chunk_rows, len(idx))
        block = buf[:stop - start]
        if picks is None:
            block.copy_(src[start:stop])
        else:
            part = gathered[:stop - start]
            torch.index_select(src, 0, picks[start:stop], out=part)
            block.copy_(part)
        if sq_norms is not None:
            rows64, sq, f = block.numpy(), sq_norms[start:stop], factor[:stop - start]
            np.einsum("ij,ij->i", rows64, rows64, out=sq)
            f[:] = 0.0
            np.divide(1.0, np.sqrt(sq), out=f, where=sq > 0)
            block *= torch.from_numpy(f)[:, None]
        if scale is not None:  # (a power of two: the product is exact, then rounded)
            block.mul_(scale).round_()
        out.index_add_(0, idx[start:stop], block)
    return out.numpy()
