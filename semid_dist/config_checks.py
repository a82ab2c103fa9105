"""The config's checks across keys: values that each parse fine (`semid_dist.config`) but do
not go together raise `ConfigError` naming the keys and the fix."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from semid_dist.errors import ConfigError

if TYPE_CHECKING:
    from semid_dist.config import BuildConfig, PruneConfig


def check_consistency(cfg: BuildConfig) -> None:
    """Raise ConfigError naming the keys when values that each parsed fine do not go
    together (layer sizes and the 64-bit SID key, pruning, the learned quantizers and ACRQ,
    incremental encodes, the quality depth)."""
    layers = cfg.quantizer.layers
    for i, size in enumerate(layers):
        if not 2 <= size <= 1 << 20:
            raise ConfigError(f"quantizer.layers[{i}]: {size} is out of range [2, 1048576]")
    if sum(math.log2(s + 1) for s in layers) > 62:
        raise ConfigError(
            f"quantizer.layers={list(layers)}: the product of (layer size + 1) exceeds 2^62, "
            "so a SID no longer fits one 64-bit key; use fewer or smaller layers")
    _check_prune(cfg.prune, len(layers))
    _check_learned(cfg)
    if cfg.encode.incremental and not cfg.encode.from_version:
        raise ConfigError("encode.incremental=true extends the version named by "
                          "encode.from_version, which is unset; run `semid encode "
                          "--incremental` (from the latest version) or set "
                          "encode.from_version=<version id>")
    depth = cfg.quality_depth
    if depth > len(layers):
        raise ConfigError(
            f"metrics.quality_depth: {depth} > number of layers {len(layers)}; "
            f"set it to at most {len(layers)} or leave it unset")


def _check_acrq(cfg: BuildConfig) -> None:
    q = cfg.quantizer
    if q.method != "acrq":
        if q.anchor_layers or q.acrq_base != "rq_kmeans":
            raise ConfigError(f"quantizer.anchor_layers / acrq_base are for "
                              f"quantizer.method=acrq, not {q.method}; unset them")
        return
    anchors, layers = cfg.anchor_sizes, q.layers
    if len(anchors) != len(layers):
        raise ConfigError(f"quantizer.anchor_layers={list(anchors)} has {len(anchors)} sizes "
                          f"but quantizer.layers has {len(layers)}; give one per layer")
    for i, (a, k) in enumerate(zip(anchors, layers)):
        if not 1 <= a < k:
            raise ConfigError(f"quantizer.anchor_layers[{i}]: {a} must be in [1, {k - 1}] "
                              f"(below quantizer.layers[{i}]={k}, leaving room for the tail's "
                              "extension codewords)")
    if any(b < a for a, b in zip(anchors, anchors[1:])):
        raise ConfigError(f"quantizer.anchor_layers={list(anchors)} must not decrease over "
                          "the layers (ACRQ's curriculum: coarse early layers, finer later)")
    if not cfg.input.popularity_column and not cfg.encode.from_version:
        raise ConfigError("quantizer.method=acrq splits the fit sample into head and tail "
                          "items by popularity; set input.popularity_column")
    if cfg.fit.warm_start != "none":
        raise ConfigError("fit.warm_start=parent is not supported by quantizer.method=acrq; "
                          "set fit.warm_start=none")


def _check_learned(cfg: BuildConfig) -> None:
    q = cfg.quantizer
    for i, h in enumerate(q.hidden_dims):
        if not 1 <= h <= 65_536:
            raise ConfigError(f"quantizer.hidden_dims[{i}]: {h} is out of range [1, 65536]")
    _check_acrq(cfg)
    if not cfg.learned:
        if cfg.fit.precision != "fp32":
            raise ConfigError(f"fit.precision={cfg.fit.precision} is for the learned "
                              f"quantizers (rq_vae, r3vae, acrq with quantizer.acrq_base="
                              f"rq_vae), not {q.method}; set fit.precision=fp32")
        return
    if cfg.encode.precision != "fp32":
        raise ConfigError(f"encode.precision={cfg.encode.precision} is supported by "
                          f"residual k-means quantizers only (rq_kmeans, acrq with "
                          f"acrq_base=rq_kmeans), not {q.method}; set "
                          "encode.precision=fp32")
    if cfg.collisions.max_per_sid is not None:
        raise ConfigError(f"collisions.max_per_sid is supported by residual k-means "
                          f"quantizers only (rq_kmeans, acrq with acrq_base=rq_kmeans), not "
                          f"{q.method}; unset collisions.max_per_sid")
    if cfg.fit.warm_start != "none":
        raise ConfigError(f"fit.warm_start=parent is supported by quantizer.method=rq_kmeans "
                          f"only, not {q.method}; set fit.warm_start=none")


def _check_prune(prune: PruneConfig, n_layers: int) -> None:
    s = prune.strategy
    if s in ("drop_layer", "top_k", "mass") and prune.layer >= n_layers:
        raise ConfigError(f"prune.layer: {prune.layer} but there are only {n_layers} layers "
                          f"(0..{n_layers - 1})")
    if s == "drop_layer" and n_layers < 2:
        raise ConfigError("prune.strategy=drop_layer needs at least 2 layers")
    if s == "mass" and prune.p <= 0:
        raise ConfigError("prune.strategy=mass needs prune.p in (0, 1], e.g. prune.p=0.3")
    if s == "sarq" and not 0 < prune.tau < 1:
        raise ConfigError("prune.strategy=sarq needs prune.tau in (0, 1), e.g. prune.tau=0.001")
