"""ACRQ, anchored curriculum residual quantization (paper 002, section 2.2), on residual
k-means (`fit_acrq`) and on RQ-VAE (`fit_acrq_vae`).

Stage 1 (curriculum for head items): residual k-means on the head of the sample (the most
popular items) with the anchor sizes a_l, non-decreasing over the layers, so the early
layers hold coarse, robust semantics. Stage 2 (anchored transfer for tail items): residual
k-means on the tail with each layer's codebook = the stage-1 anchors (frozen, bit-identical)
+ k_l - a_l extension centroids (trainable; k-means++ continues from the anchors). The
result is a plain list of L codebooks (k_l, d): it encodes like rq_kmeans, every engine and
the capacity bound included.

On RQ-VAE, stage 1 trains an RQ-VAE on the head with the anchor sizes; stage 2 starts an
RQ-VAE of the full sizes from its encoder, decoder and codebooks (anchors first, the
extensions seeded by k-means on the tail latents, continued from the anchors) and trains it
on the tail with the anchors' gradient masked (and restored after every step, so they stay
bit-identical whatever the optimizer's weight decay does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from semid_dist.errors import InputError
from semid_dist.quantize.kmeans import AllReduce, kmeans
from semid_dist.quantize.residual import OnLayer, fit_residual_kmeans, init_subset
from semid_dist.quantize.rqvae import RQVAE, fit_rq_vae, nearest_code
from semid_dist.quantize.training import (
    EpochHook,
    LearnedParams,
    Sync,
    TrainState,
    Wrap,
    deterministic,
    train,
)

Progress = Callable[[str], None]


def worker_rows(sample: np.ndarray, head: np.ndarray, rank: int,
                world: int) -> tuple[np.ndarray, np.ndarray]:
    """A data-parallel worker's rows for ACRQ: its stride of the head rows and of the tail
    rows (so every worker holds a near-equal share of both stages) -> (x, head flags)."""
    h, t = sample[head][rank::world], sample[~head][rank::world]
    flags = np.concatenate([np.ones(len(h), bool), np.zeros(len(t), bool)])
    return np.concatenate([h, t]), flags


@dataclass(frozen=True)
class AcrqSample:
    """The fit sample's head / tail split. head: (n,) bool over the sample rows (popularity
    at or above the head threshold); head_seeds / tail_seeds: the k-means++ seeding points of
    each stage, held identically by every worker."""

    head: np.ndarray
    head_seeds: np.ndarray
    tail_seeds: np.ndarray


def split_sample(sample: np.ndarray, head: np.ndarray, layers: tuple[int, ...] | list[int],
                 anchors: tuple[int, ...] | list[int], *, seed: int) -> AcrqSample:
    """Check both stages have enough rows and pick their seeding points."""
    n_head, n_tail = int(head.sum()), int((~head).sum())
    need_head = max(anchors)
    need_tail = max(k - a for k, a in zip(layers, anchors))
    if n_head == 0 or n_tail == 0:
        raise InputError(f"acrq: the fit sample's popularity puts {n_head} rows in the head "
                         f"and {n_tail} in the tail; check input.popularity_column (all null, "
                         "zero or equal values leave nothing to split; every item tied at the "
                         "head's threshold joins the head: popularity counts where most items "
                         "hold the lowest value put them all there) and metrics.head_share "
                         "(strictly between 0 and 1: a lower share)")
    if n_head < need_head:
        raise InputError(f"acrq: the fit sample holds {n_head} head rows, fewer than the "
                         f"largest anchor codebook ({need_head}); raise metrics.head_share "
                         "or fit.sample_size, or use smaller quantizer.anchor_layers")
    if n_tail < need_tail:
        raise InputError(f"acrq: the fit sample holds {n_tail} tail rows, fewer than the "
                         f"largest extension ({need_tail} codewords); lower "
                         "metrics.head_share or raise fit.sample_size")
    return AcrqSample(head=head,
                      head_seeds=init_subset(sample[head], need_head, seed=seed),
                      tail_seeds=init_subset(sample[~head], need_tail, seed=seed + 1))


def fit_acrq(x: np.ndarray, head: np.ndarray, layers: tuple[int, ...] | list[int],
             anchors: tuple[int, ...] | list[int], split: AcrqSample, *, niter: int = 20,
             seed: int = 0, all_reduce: AllReduce | None = None, chunk_rows: int = 8192,
             device: str = "cpu", progress: Progress | None = None,
             fitted: list[tuple[np.ndarray, dict[str, Any]]] | None = None,
             on_layer: OnLayer | None = None) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """x: (n_local, d) this worker's rows of the sample, head: their (n_local,) head flags.

    Checkpoints count 2L steps: stage 1's L anchor codebooks, then stage 2's L full ones
    (`fitted` / `on_layer` as in `fit_residual_kmeans`, step index and codebooks so far).
    Returns (L codebooks (k_l, d) float32 whose first a_l rows are the anchors, per-layer
    stats with both stages')."""
    n_layers = len(layers)
    done = fitted or []

    def say(stage: str) -> Progress | None:
        return None if progress is None else (lambda msg: progress(f"acrq {stage}: {msg}"))

    def stage1_layer(layer: int, books: list[np.ndarray], stats: list[dict[str, Any]]) -> None:
        if on_layer is not None:
            on_layer(layer, books, stats)

    anchor_books, anchor_stats = fit_residual_kmeans(
        x[head], anchors, niter=niter, seed=seed, init_points=split.head_seeds,
        all_reduce=all_reduce, chunk_rows=chunk_rows, device=device, progress=say("head"),
        fitted=done[:n_layers] or None, on_layer=stage1_layer)

    def stage2_layer(layer: int, books: list[np.ndarray], stats: list[dict[str, Any]]) -> None:
        if on_layer is not None:
            on_layer(n_layers + layer, anchor_books + books, anchor_stats + stats)

    books, tail_stats = fit_residual_kmeans(
        x[~head], layers, niter=niter, seed=seed + 7, init_points=split.tail_seeds,
        all_reduce=all_reduce, chunk_rows=chunk_rows, device=device, progress=say("tail"),
        fitted=done[n_layers:] or None, on_layer=stage2_layer, anchors=anchor_books)
    stats = [{**tail, "layer": layer, "anchors": int(anchors[layer]),
              "head": {k: v for k, v in head_st.items() if k != "layer"}}
             for layer, (tail, head_st) in enumerate(zip(tail_stats, anchor_stats))]
    return books, stats


def fit_acrq_vae(x: np.ndarray, head: np.ndarray, layers: tuple[int, ...] | list[int],
                 anchors: tuple[int, ...] | list[int], split: AcrqSample,
                 params: LearnedParams, *, sync: Sync | None = None, wrap: Wrap | None = None,
                 device: str = "cpu", progress: Progress | None = None,
                 on_epoch: EpochHook | None = None, resume: TrainState | None = None,
                 ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """ACRQ on RQ-VAE. x / head: this worker's rows of the sample and their head flags.
    on_epoch / resume as in `semid_dist.quantize.training.train`; each checkpoint names its
    stage, and a stage-2 checkpoint holds everything stage 2 needs (stage 1 is not rerun).
    Returns (RQVAE with the full sizes on CPU, per-layer stats of stage 2 with the anchor
    size and stage 1's stats)."""

    head_stats: list[dict[str, Any]] = []

    def hook(stage: int) -> EpochHook | None:
        if on_epoch is None:
            return None
        return lambda record, snapshot: on_epoch(
            {**record, "stage": stage},
            lambda: replace(snapshot(), stage=stage, notes={"head_stats": head_stats}))

    def say(stage: str) -> Progress | None:
        return None if progress is None else (lambda msg: progress(f"acrq {stage}: {msg}"))

    in_stage2 = resume is not None and resume.stage == 2
    with deterministic(params.seed):
        model = RQVAE(x.shape[1], layers, params)
        if in_stage2:  # stage 1 finished before the checkpoint: its figures travel with it
            head_stats.extend(resume.notes["head_stats"])
        else:
            head_model, stats1 = fit_rq_vae(
                x[head], split.head_seeds, anchors, params, sync=sync, wrap=wrap,
                device=device, progress=say("head"), on_epoch=hook(1), resume=resume)
            head_stats.extend(stats1)
            _extend(model, head_model, split.tail_seeds, params.seed)
        model.to(device)
        tail_stats = train(model, x[~head], params, sync=sync, wrap=wrap, device=device,
                           progress=say("tail"), on_epoch=hook(2),
                           resume=resume if in_stage2 else None, frozen_rows=tuple(anchors))
    stats = [{**tail, "anchors": int(anchors[layer]),
              "head": {k: v for k, v in head_st.items() if k not in ("layer", "epochs")}}
             for layer, (tail, head_st) in enumerate(zip(tail_stats, head_stats))]
    return model.cpu().eval(), stats


@torch.no_grad()
def _extend(model: nn.Module, head_model: nn.Module, tail_seeds: np.ndarray,
            seed: int) -> None:
    """Stage 2's start: the head model's encoder / decoder, and per layer its codebook as the
    anchors followed by extensions from k-means (continued from the anchors) on the tail
    seeds' latent residuals."""
    state = {k: v for k, v in head_model.state_dict().items() if not k.startswith("codebooks.")}
    model.load_state_dict({**model.state_dict(), **state})
    r = head_model.encoder(torch.from_numpy(np.array(tail_seeds, np.float32)))
    r = r.numpy().astype(np.float32)
    for layer, k in enumerate(model.layers):
        frozen = head_model.codebooks[layer].detach().numpy().astype(np.float32)
        cb, _ = kmeans(r, k, niter=10, seed=seed + 1000 * layer, frozen=frozen)
        r = r - cb[nearest_code(torch.from_numpy(r), torch.from_numpy(cb)).numpy()]
        model.codebooks[layer].copy_(torch.from_numpy(cb))
