"""When a learned quantizer's training has diverged (`check_diverged`), measured against
the errors of zero vectors and of the untrained model (`bound`): a learning rate too high
for the data, or embeddings whose squares overflow float32, committed a table of one SID
with status 0."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from semid_dist.errors import FitDiverged

if TYPE_CHECKING:
    from semid_dist.quantize.training import LearnedParams, Sync

DIVERGED_RATIO = 10.0  # a reconstruction error this many times the worse of `bound`'s
UNTRAINED_ROWS = 8192  # per worker: the rows the untrained model's error is measured on


def bound(model: nn.Module, x: np.ndarray, xt: torch.Tensor, n_total: int, sync: Sync,
          device: str) -> dict[str, float]:
    """{"items": the items' mean squared norm (zero vectors' error), "untrained": the
    model's error before this training (on up to `UNTRAINED_ROWS` rows a worker)}, over all
    workers. Measured before a checkpoint's weights are loaded, so a resumed fit measures
    against what an uninterrupted one does (ACRQ's second stage: against the model it
    starts from, which a stage-2 resume rebuilds only in part)."""
    head = xt[:UNTRAINED_ROWS]
    model.eval()
    with torch.no_grad():
        untrained = float(model(head.to(device)).recon.sum()) if len(head) else 0.0
    sums = sync.all_reduce(torch.tensor([_sum_sq(x), untrained, float(len(head))],
                                        dtype=torch.float64))
    return {"items": float(sums[0]) / max(n_total, 1),
            "untrained": float(sums[1]) / max(float(sums[2]), 1.0)}


def _sum_sq(x: np.ndarray, rows: int = 65536) -> float:
    """Sum of squares of x's entries, in float64, a block of rows at a time."""
    return sum(float(np.einsum("ij,ij->", b, b, dtype=np.float64))
               for b in (x[i:i + rows] for i in range(0, len(x), rows)))


def check_diverged(record: dict[str, Any], params: LearnedParams, bound: dict[str, float], *,
                   last: bool) -> None:
    """FitDiverged where an epoch's loss or reconstruction error is not finite, or the
    last epoch's reconstruction error is over `DIVERGED_RATIO` times both the items' mean
    squared norm (`bound["items"]`: zero vectors' error) and the untrained model's error
    (`bound["untrained"]`: a decoder's first outputs can dwarf embeddings of small norm):
    a learning rate too high for the data, or embeddings whose squares overflow float32.
    Its figures are all-reduced, so every worker stops at the same epoch."""
    loss, recon = record["loss"], record["reconstruction"]
    finite = math.isfinite(loss) and math.isfinite(recon)
    worst = max(bound["items"], bound["untrained"])
    if finite and not (last and recon > DIVERGED_RATIO * worst):
        return
    ratio = (f", {recon / bound['items']:.3g} times the items' mean squared norm"
             if finite and bound["items"] > 0 else "")
    raise FitDiverged(f"the fit diverged (epoch {record['epoch']}: loss {loss:.4g}, "
                      f"reconstruction error {recon:.4g}{ratio}); lower quantizer.lr (now "
                      f"{params.lr:g}), or scale the embeddings down (items' mean squared "
                      f"norm {bound['items']:.4g})")
