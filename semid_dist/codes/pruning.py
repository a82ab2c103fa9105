"""Pruning to variable-length SIDs (papers 000/001 hourglass remedies, 002 SARQ).

A `PruneDecision` is made once from global counts, then applied per item by any engine:
- none: keep every layer;
- drop_layer: remove layer `layer` (default 1, the paper's "layer 2") from every SID;
- top_k: remove the layer-`layer` token from items whose token is one of the K most frequent;
- mass: like top_k with the fewest most-frequent tokens whose share of items reaches p;
- sarq: stop each SID at the first depth whose prefix holds no more than tau of the catalog.
Tokens are layer-scoped (`offset[layer] + code`), so a pruned SID stays unambiguous; final
SID keys use radix (k_l + 1) with k_l meaning "layer absent".
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from semid_dist.codes.partials import radix


@dataclass(frozen=True)
class PruneDecision:
    strategy: str
    sizes: tuple[int, ...]
    layer: int = 1
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    big_prefixes: tuple[np.ndarray, ...] = ()  # sarq: per depth 1..L-1, keys with share > tau

    @property
    def pruned_tokens(self) -> int:
        return int(len(self.tokens))

    def to_bytes(self) -> bytes:
        """npz (no pickle): what an incremental version needs to prune carried and new items
        the same way as its parent."""
        meta = json.dumps({"strategy": self.strategy, "sizes": list(self.sizes),
                           "layer": self.layer, "depths": len(self.big_prefixes)})
        arrays = {f"big_{i}": np.asarray(b, np.int64) for i, b in enumerate(self.big_prefixes)}
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(meta.encode(), np.uint8),
                 tokens=np.asarray(self.tokens, np.int64), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PruneDecision:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        meta = json.loads(z["meta"].tobytes())
        return cls(meta["strategy"], tuple(meta["sizes"]), meta["layer"], z["tokens"],
                   tuple(z[f"big_{i}"] for i in range(meta["depths"])))


def token_offsets(sizes: tuple[int, ...] | list[int]) -> np.ndarray:
    """Global token id of (layer, code) is offsets[layer] + code."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def codes_of_keys(keys: np.ndarray, sizes: tuple[int, ...] | list[int]) -> np.ndarray:
    """Inverse of `sid_keys`: (n,) int64 full-SID keys -> (n, L) int64 codes."""
    r = radix(list(sizes))
    return (keys[:, None] // r[None, :]) % np.asarray(sizes, dtype=np.int64)[None, :]


def _most_frequent(counts: np.ndarray) -> np.ndarray:
    """Token ids by count descending, ties by token id."""
    return np.lexsort((np.arange(len(counts)), -counts))


def decide(strategy: str, sizes: tuple[int, ...], layer_counts: list[np.ndarray],
           sid_keys: np.ndarray, sid_counts: np.ndarray, *, layer: int = 1, k: int = 0,
           p: float = 0.0, tau: float = 0.0) -> PruneDecision:
    """Make the pruning decision from global counts (pure, deterministic)."""
    if strategy in ("drop_layer", "top_k", "mass") and not 0 <= layer < len(sizes):
        raise ValueError(f"prune.layer {layer} outside 0..{len(sizes) - 1}")
    if strategy == "none":
        return PruneDecision("none", sizes)
    counts = layer_counts[layer] if strategy != "sarq" else None
    if strategy == "drop_layer":
        return PruneDecision(strategy, sizes, layer, np.arange(sizes[layer], dtype=np.int64))
    if strategy == "top_k":
        ranked = _most_frequent(counts)[:k]
        return PruneDecision(strategy, sizes, layer, np.sort(ranked[counts[ranked] > 0]))
    if strategy == "mass":
        ranked = _most_frequent(counts)
        share = np.cumsum(counts[ranked]) / max(counts.sum(), 1)
        n_tokens = int(np.searchsorted(share, p, side="left") + 1) if p > 0 else 0
        return PruneDecision(strategy, sizes, layer, np.sort(ranked[:min(n_tokens, len(ranked))]))
    if strategy == "sarq":
        n = int(sid_counts.sum())
        codes = codes_of_keys(sid_keys, sizes)
        big = []
        for depth in range(1, len(sizes)):
            pk = codes[:, :depth] @ radix(list(sizes[:depth]))
            uniq, inv = np.unique(pk, return_inverse=True)
            per = np.bincount(inv, weights=sid_counts)
            big.append(uniq[per > tau * n])
        return PruneDecision(strategy, sizes, big_prefixes=tuple(big))
    raise ValueError(f"unknown prune strategy {strategy!r}")


def kept_layers(codes: np.ndarray, decision: PruneDecision) -> np.ndarray:
    """codes: (n, L) int -> (n, L) bool, True where the layer stays in the item's SID."""
    n, n_layers = codes.shape
    kept = np.ones((n, n_layers), dtype=bool)
    s = decision.strategy
    if s in ("drop_layer", "top_k", "mass"):
        kept[:, decision.layer] = ~np.isin(codes[:, decision.layer], decision.tokens)
    elif s == "sarq":
        going = np.ones(n, dtype=bool)  # still descending: prefix so far is over tau
        for depth in range(1, n_layers):
            pk = codes[:, :depth].astype(np.int64) @ radix(list(decision.sizes[:depth]))
            going &= np.isin(pk, decision.big_prefixes[depth - 1])
            kept[:, depth] = going
    return kept


def final_keys(codes: np.ndarray, kept: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """(n,) int64 key of the final variable-length SID (absent layer -> code k_l)."""
    filled = np.where(kept, codes, np.asarray(sizes)[None, :]).astype(np.int64)
    return filled @ radix([s + 1 for s in sizes])


def layer_counts_after(codes: np.ndarray, weights: np.ndarray, kept: np.ndarray,
                       sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Per-layer token counts over the layers items keep (weights: items per row)."""
    return [np.bincount(codes[kept[:, i], i], weights=weights[kept[:, i]],
                        minlength=size).astype(np.int64) for i, size in enumerate(sizes)]
