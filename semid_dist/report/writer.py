"""Render the report of one version from its own files, through the store.

Reads metrics.json and analytics/*.parquet with `TableStore.read_bytes`, which takes a version
id directly, so it works on a version that is still being built (before its manifest) as well
as on a committed one. Writes `report/report.html` and `report/<figure>.png`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.errors import StoreError
from semid_dist.io.store import FileEntry, TableStore
from semid_dist.report import figures as F
from semid_dist.report.html import Figure, render

REPORT_DIR = "report"
REPORT_HTML = f"{REPORT_DIR}/report.html"
ANALYTICS = ("analytics/token_counts.parquet", "analytics/flows.parquet",
             "analytics/sid_sizes.parquet")


@dataclass(frozen=True)
class VersionData:
    """What the figures need, as plain arrays. Per-layer lists hold (k_l,) int64 arrays
    indexed by code; flows and sid_sizes hold (R,) / (B,) int64 columns."""

    metrics: dict[str, Any]
    items: list[np.ndarray]
    items_after: list[np.ndarray]
    items_head: list[np.ndarray] | None
    items_tail: list[np.ndarray] | None
    flows: dict[str, np.ndarray]
    sid_sizes: dict[str, np.ndarray]


def _read(store: TableStore, vid: str, rel: str) -> bytes:
    try:
        return store.read_bytes(vid, rel)
    except FileNotFoundError as exc:
        raise StoreError(f"version {vid} of table {store.url!r} has no {rel} (built by an "
                         "older semid_dist, or damaged): rebuild it to get a report") from exc


def _parquet(store: TableStore, vid: str, rel: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(_read(store, vid, rel)))


def _per_layer(layer: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """Split a column of the (layer, token)-sorted token table into one array per layer."""
    return np.split(values, np.cumsum(np.bincount(layer))[:-1]) if len(layer) else []


def load_version(store: TableStore, vid: str) -> VersionData:
    """Read metrics.json and the analytics tables of version `vid` (committed or not)."""
    try:
        metrics = json.loads(_read(store, vid, "metrics.json"))
    except ValueError as exc:
        raise StoreError(f"version {vid} of table {store.url!r}: metrics.json cannot be read "
                         f"({exc}); the version is damaged: rebuild it") from None
    tokens, flows, sizes = (_parquet(store, vid, rel) for rel in ANALYTICS)
    layer, token = tokens["layer"].to_numpy(), tokens["token"].to_numpy()
    order = np.lexsort((token, layer))
    layer = layer[order]

    def col(name: str) -> list[np.ndarray] | None:
        if name not in tokens.column_names:
            return None
        return _per_layer(layer, tokens[name].to_numpy()[order].astype(np.int64))

    return VersionData(
        metrics=metrics, items=col("items") or [], items_after=col("items_after_pruning") or [],
        items_head=col("items_head"), items_tail=col("items_tail"),
        flows={c: flows[c].to_numpy().astype(np.int64) for c in
               ("to_layer", "parent", "child", "items")},
        sid_sizes={c: sizes[c].to_numpy().astype(np.int64) for c in sizes.column_names})


def _head_tail(data: VersionData) -> Figure | None:
    head, tail = data.metrics.get("head", {}), data.metrics.get("tail", {})
    if not (head.get("items") and tail.get("items")):
        return None
    parts = [{"items": p["items"], "gini": [x["gini"] for x in p["layers"]],
              "entropy_norm": [x["entropy_norm"] for x in p["layers"]]} for p in (head, tail)]
    return Figure("head_tail", "Head vs tail", "Per-layer concentration of the codes of "
                  "popular (head) and long-tail items.", F.head_tail_figure(*parts))


def make_figures(data: VersionData) -> list[Figure]:
    """Every figure of the report, in page order."""
    m = data.metrics
    rec, strategy = m["reconstruction"], m.get("pruning", {}).get("strategy", "none")
    pruned = [2 * a < b for a, b in zip(data.items_after, data.items)]  # most items cut
    figs = [
        Figure("token_flow", "Token flow between layers", "Each column is a layer; tokens are "
               "stacked largest first with height = share of items; curves show the heaviest "
               "parent → child routes, width by items; red tokens lose most of their items to "
               "pruning.",
               F.token_flow_figure(data.items, data.flows, pruned=pruned)),
        Figure("rank_frequency", "Rank-frequency per layer", "Items per token against rank, "
               "log-log; a steep head means a few tokens take most items.",
               F.rank_frequency_figure(data.items)),
        Figure("lorenz", "Lorenz curves per layer", "Cumulative share of items held by the "
               "least-used tokens; the further from the diagonal, the higher the Gini.",
               F.lorenz_figure(data.items)),
        Figure("pruning", "Before and after pruning", f"Rank-frequency per layer before and "
               f"after pruning (strategy {strategy}).",
               F.pruning_figure(data.items, data.items_after, strategy=strategy)),
        Figure("sid_sizes", "Items per SID", "How many SIDs hold 1, 2, 3-4, 5-8, ... items, before "
               "and after pruning (collisions are then told apart by the suffix).",
               F.sid_size_figure(data.sid_sizes["items_per_sid"],
                                 data.sid_sizes["sids_before"], data.sid_sizes["sids_after"])),
        Figure("residual_norm", "Residual norm per layer", "Mean norm of what is left to "
               "encode after each layer.", F.residual_norm_figure(
                   rec["residual_norm_by_layer"], rec.get("residual_sq_norm_by_layer"))),
    ]
    head_tail = _head_tail(data)
    return figs + ([head_tail] if head_tail else [])


def write_report(store: TableStore, version_id: str) -> list[FileEntry]:
    """Render the report of `version_id` from its metrics.json and analytics tables and write
    `report/report.html` plus one `report/<figure>.png` per figure; returns their entries
    (PNG files first, the page last)."""
    data = load_version(store, version_id)
    figs = make_figures(data)
    # the version's place in its table, not the root's: a re-render of a moved or copied
    # table gives the bytes its manifest holds
    page = render(version_id, data.metrics, figs, source=f"{store.table}/versions/{version_id}")
    entries = [store.write_file(version_id, f"{REPORT_DIR}/{f.file}", f.png) for f in figs]
    return entries + [store.write_file(version_id, REPORT_HTML, page.encode("utf-8"))]
