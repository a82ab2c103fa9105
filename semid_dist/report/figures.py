"""Report figures as PNG bytes, from plain arrays and dicts (never from a store or an engine).

matplotlib (Agg backend) is imported inside the functions, so importing this module is cheap.
Layers are named L0, L1, ...; a token is `<L{layer}_{code}>` as in vocab.parquet.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from semid_dist.codes.metrics import gini

DPI = 100
FLOW_EDGES = 300  # edges drawn per layer transition in the flow figure
FLOW_LABELS = 5  # tokens labelled per layer in the flow figure
_COLUMN_WIDTH = 0.16


# Margins in inches (left, right, bottom, top) around the axes: room for tick labels and an
# axis label at left and bottom, a title at top. At left, a log axis spanning less than a
# decade labels its minor ticks too ("6x10^3")
MARGINS = (0.95, 0.15, 0.55, 0.35)


def _figure(width: float, height: float, ncols: int = 1, *, share: bool = False,
            margins: tuple[float, float, float, float] = MARGINS, gap: float = 0.3
            ) -> tuple[Any, Any]:
    """A figure on its own Agg canvas (no pyplot, no global backend switch) and its axes,
    placed by fixed margins (inches; `gap`: the space between axes, a share of an axes'
    width). No layout engine: matplotlib's constrained layout measured every label twice
    before drawing; a version's figures (3 x 256 layers) took 0.80-1.06 s against 1.25-1.44
    with it. tests/test_report.py checks that the margins hold the labels of wide and narrow
    count ranges and of one to eight layers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    _set_margins(fig, *margins, gap=gap)
    return fig, fig.subplots(1, ncols, squeeze=False, sharex=share, sharey=share)[0]


def _set_margins(fig: Any, left: float, right: float, bottom: float, top: float, *,
                 gap: float = 0.3) -> None:
    """Place the figure's axes by margins in inches."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=gap)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _sorted_desc(counts: np.ndarray) -> np.ndarray:
    """(k,) counts -> the non-zero counts, largest first, float64."""
    c = np.asarray(counts, dtype=np.float64)
    return -np.sort(-c[c > 0])


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def top_edges(to_layer: np.ndarray, items: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` rows with most items within each `to_layer` group.

    to_layer: (R,) int, items: (R,) int. Returns (<= n * groups,) int64 row indices, sorted.
    Linear time per group (argpartition); R may be millions.
    """
    to_layer, items = np.asarray(to_layer), np.asarray(items)
    picked = []
    for layer in np.unique(to_layer):
        rows = np.flatnonzero(to_layer == layer)
        if len(rows) > n:
            rows = rows[np.argpartition(-items[rows], n - 1)[:n]]
        picked.append(rows)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _column_layout(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack one layer's tokens top-down, largest first, heights = item share.

    counts: (k,) items per token. Returns (order (k,), top (k,), height (k,)) where top and
    height are indexed by token (not by rank); y runs from 1 (top) to 0.
    """
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum() or 1.0
    order = np.lexsort((np.arange(len(c)), -c))
    height = c / total
    top = np.empty(len(c))
    top[order] = 1.0 - np.concatenate([[0.0], np.cumsum(height[order])[:-1]])
    return order, top, height


def _draw_column(ax: Any, x: float, order: np.ndarray, top: np.ndarray, height: np.ndarray,
                 pruned: np.ndarray | None) -> None:
    from matplotlib.collections import PolyCollection

    x0, x1 = x - _COLUMN_WIDTH / 2, x + _COLUMN_WIDTH / 2
    bottom = top - height
    verts = np.stack([np.stack([np.full_like(top, x0), bottom], 1),
                      np.stack([np.full_like(top, x1), bottom], 1),
                      np.stack([np.full_like(top, x1), top], 1),
                      np.stack([np.full_like(top, x0), top], 1)], axis=1)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    even = (rank % 2 == 0)[:, None]
    colors = np.where(even, [[0.19, 0.40, 0.62, 1.0]], [[0.45, 0.63, 0.80, 1.0]])
    if pruned is not None:
        red = np.where(even, [[0.78, 0.20, 0.15, 1.0]], [[0.93, 0.45, 0.40, 1.0]])
        colors = np.where(np.asarray(pruned, bool)[:, None], red, colors)
    ax.add_collection(PolyCollection(verts, facecolors=colors, edgecolors="none"))


def _draw_edges(ax: Any, x: float, parent_y: np.ndarray, child_y: np.ndarray,
                items: np.ndarray) -> None:
    """Smooth curves from column x-1 to column x, width by items. Arrays: (E,)."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection

    if len(items) == 0:
        return
    t = np.linspace(0.0, 1.0, 16)[None, :]
    xs = (x - 1 + _COLUMN_WIDTH / 2) + (1 - _COLUMN_WIDTH) * t
    ys = parent_y[:, None] + (child_y - parent_y)[:, None] * (3 * t**2 - 2 * t**3)
    segs = np.stack([np.broadcast_to(xs, ys.shape), ys], axis=2)
    w = items / max(float(items.max()), 1.0)
    colors = colormaps["viridis"](np.clip(parent_y, 0, 1))
    colors[:, 3] = 0.15 + 0.45 * w
    order = np.argsort(w, kind="stable")  # heaviest drawn last, on top
    ax.add_collection(LineCollection(segs[order], linewidths=0.3 + 5.0 * w[order],
                                     colors=colors[order], zorder=1))


def _label_top(ax: Any, layer: int, order: np.ndarray, top: np.ndarray, height: np.ndarray,
               n: int) -> None:
    """Name the n largest tokens beside the column, labels pushed apart so they never
    overlap."""
    label_y = 2.0
    for token in order[:n]:
        if height[token] <= 0:
            break
        centre = top[token] - height[token] / 2
        label_y = min(centre, label_y - 0.045)
        ax.annotate(f"<L{layer}_{token}> {height[token]:.1%}", xy=(layer + _COLUMN_WIDTH / 2,
                    centre), xytext=(layer + _COLUMN_WIDTH / 2 + 0.06, label_y), fontsize=8,
                    va="center", zorder=3, arrowprops={"arrowstyle": "-", "color": "0.3",
                                                       "lw": 0.6},
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                          "alpha": 0.8})


def token_flow_figure(layer_items: Sequence[np.ndarray], flows: dict[str, np.ndarray], *,
                      pruned: Sequence[np.ndarray] | None = None, max_edges: int = FLOW_EDGES,
                      labels: int = FLOW_LABELS, title: str = "") -> bytes:
    """The hourglass picture: one column per layer, tokens stacked largest first with height
    = share of items; curves route items from layer l-1 to layer l (the `max_edges` heaviest
    pairs per transition, width by items); the `labels` largest tokens per layer named.

    layer_items: L arrays (k_l,) int, items per token. flows: `to_layer`, `parent`, `child`,
    `items`, each (R,) int (R may be millions). pruned: L (k_l,) bool, tokens cut by pruning
    (drawn red). Returns PNG bytes.
    """
    n_layers = len(layer_items)
    # at least as wide as the title (one or two layers)
    fig, (ax,) = _figure(max(7.8, 3.4 * n_layers), 7.0, margins=(0.1, 0.1, 0.1, 0.35))
    layouts = [_column_layout(c) for c in layer_items]
    for layer, (order, top, height) in enumerate(layouts):
        _draw_column(ax, layer, order, top, height, None if pruned is None else pruned[layer])
        _label_top(ax, layer, order, top, height, labels)
        c = np.asarray(layer_items[layer])
        ax.text(layer, -0.03, f"L{layer}: {int((c > 0).sum())}/{len(c)} tokens used\n"
                f"Gini {gini(c):.3f}", ha="center", va="top", fontsize=9)
    rows = top_edges(flows["to_layer"], flows["items"], max_edges)
    to_layer = np.asarray(flows["to_layer"])[rows]
    for layer in range(1, n_layers):
        sel = rows[to_layer == layer]
        (_, ptop, ph), (_, ctop, ch) = layouts[layer - 1], layouts[layer]
        parent, child = np.asarray(flows["parent"])[sel], np.asarray(flows["child"])[sel]
        _draw_edges(ax, layer, ptop[parent] - ph[parent] / 2, ctop[child] - ch[child] / 2,
                    np.asarray(flows["items"], dtype=np.float64)[sel])
    ax.set_xlim(-0.4, n_layers - 0.35)
    ax.set_ylim(-0.12, 1.02)
    ax.set_axis_off()
    ax.set_title(title or f"Token flow between layers (top {max_edges} routes per transition; "
                 "height = share of items; red = mostly pruned)", fontsize=10)
    return _png(fig)


def rank_frequency_figure(layer_items: Sequence[np.ndarray]) -> bytes:
    """Items per token against the token's rank, log-log, one line per layer.

    layer_items: L arrays (k_l,) int. Unused tokens (0 items) are not drawn."""
    fig, (ax,) = _figure(7.0, 4.2)
    drawn = False
    for layer, counts in enumerate(layer_items):
        c = _sorted_desc(counts)
        if len(c):
            ax.loglog(np.arange(1, len(c) + 1), c, marker=".", ms=2, lw=1.2,
                      label=f"L{layer} ({len(c)}/{len(counts)} used)")
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        _empty_note(ax, "no items")
    ax.set(xlabel="token rank", ylabel="items", title="Rank-frequency of tokens per layer")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def lorenz_figure(layer_items: Sequence[np.ndarray]) -> bytes:
    """Lorenz curve of each layer's token counts (unused tokens count as 0), Gini in the
    legend. layer_items: L arrays (k_l,) int."""
    fig, (ax,) = _figure(5.4, 4.2)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="equal use")
    for layer, counts in enumerate(layer_items):
        c = np.sort(np.asarray(counts, dtype=np.float64))
        total = c.sum()
        if len(c) == 0 or total == 0:
            continue
        x = np.arange(len(c) + 1) / len(c)
        y = np.concatenate([[0.0], np.cumsum(c) / total])
        ax.plot(x, y, lw=1.5, label=f"L{layer}  Gini {gini(c):.3f}")
    ax.set(xlabel="share of tokens (least used first)", ylabel="share of items",
           xlim=(0, 1), ylim=(0, 1), title="Lorenz curves per layer")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def residual_norm_figure(residual_norm: Sequence[float],
                         residual_sq_norm: Sequence[float] | None = None, *,
                         latent_layers: int = 0) -> bytes:
    """Mean residual norm (and squared norm) after each layer. Inputs: (L,) floats; the
    first `latent_layers` are of a learned quantizer's latent residual (ticks `L{i}*`)."""
    fig, (ax,) = _figure(6.0, 4.0)
    x = np.arange(len(residual_norm))
    ax.plot(x, residual_norm, marker="o", label="mean ||r||")
    if residual_sq_norm is not None:
        ax.plot(x, residual_sq_norm, marker="s", label="mean ||r||^2")
    ax.set_xticks(x, [f"L{i}*" if i < latent_layers else f"L{i}" for i in x])
    title = "Residual norm per layer" + (" (* latent space)" if latent_layers else "")
    ax.set(xlabel="after layer", ylabel="residual", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _png(fig)


def size_bins(items_per_sid: np.ndarray, *counts: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Histogram rows (items per SID, then SIDs per column of `counts`) summed into bins of
    doubling width: 1, 2, 3-4, 5-8, ... up to the largest size present.

    items_per_sid: (B,) int >= 1; counts: arrays (B,) int. -> (bin labels, per column the
    (bins,) int64 sums)."""
    size = np.asarray(items_per_sid, dtype=np.int64)
    top = int(size.max(initial=1))
    edges = 2 ** np.arange(max(1, top.bit_length() + 1), dtype=np.int64)  # 1, 2, 4, ...
    edges = edges[:int(np.searchsorted(edges, top)) + 1]  # the last edge is >= top
    which = np.searchsorted(edges, size)  # bin b holds sizes in (edges[b-1], edges[b]]
    labels = ["1"] + [str(e) if e == 2 else f"{e // 2 + 1}-{e}" for e in edges[1:].tolist()]
    return labels, [np.bincount(which, weights=np.asarray(c, dtype=np.float64),
                                minlength=len(edges)).astype(np.int64) for c in counts]


def sid_size_figure(items_per_sid: np.ndarray, sids_before: np.ndarray,
                    sids_after: np.ndarray) -> bytes:
    """Histogram of items per SID before and after pruning, bars side by side, log y, in
    bins of doubling width (`size_bins`: a catalog's SIDs hold up to thousands of items, one
    bar per size made the figure unreadable and took seconds to draw).

    items_per_sid, sids_before, sids_after: (B,) int (the sid_sizes table)."""
    fig, (ax,) = _figure(7.0, 4.0)
    if len(items_per_sid):
        labels, (before, after) = size_bins(items_per_sid, sids_before, sids_after)
        pos = np.arange(len(labels))
        ax.bar(pos - 0.2, before, width=0.4, label="before pruning (full codes)")
        ax.bar(pos + 0.2, after, width=0.4, label="after pruning (final SIDs)")
        ax.set_xticks(pos, labels, fontsize=8)
        if len(labels) > 10:  # slanted, each ending at its tick, with room below
            ax.tick_params(axis="x", labelrotation=45)
            for label in ax.get_xticklabels():
                label.set(ha="right", rotation_mode="anchor")
            _set_margins(fig, *MARGINS[:2], 0.45 + 0.05 * max(map(len, labels)), MARGINS[3])
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        _empty_note(ax, "no SIDs")
    ax.set(xlabel="items per SID (before collision suffix)", ylabel="SIDs",
           title="Items per SID")
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def pruning_figure(before: Sequence[np.ndarray], after: Sequence[np.ndarray], *,
                   strategy: str = "none") -> bytes:
    """Rank-frequency per layer before pruning | after pruning, side by side on shared axes,
    Gini per layer in the legends. before, after: L arrays (k_l,) int, items per token."""
    fig, axes = _figure(11.0, 4.2, ncols=2, share=True, gap=0.06)
    for ax, parts, name in ((axes[0], before, "before pruning"),
                            (axes[1], after, f"after pruning ({strategy})")):
        for layer, counts in enumerate(parts):
            c = _sorted_desc(counts)
            if len(c):
                ax.loglog(np.arange(1, len(c) + 1), c, lw=1.2,
                          label=f"L{layer}  used {len(c)}  Gini {gini(counts):.3f}")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            _empty_note(ax, "no items")
        ax.set(xlabel="token rank", title=name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("items")  # the axes share it
    return _png(fig)


def head_tail_figure(head: dict[str, Sequence[float]], tail: dict[str, Sequence[float]]
                     ) -> bytes:
    """Per-layer Gini and normalized entropy for head vs tail items, bars side by side.

    head, tail: {"gini": (L,), "entropy_norm": (L,), "items": int}."""
    fig, axes = _figure(10.0, 4.0, ncols=2, gap=0.2)
    for ax, key, name in ((axes[0], "gini", "Gini (higher = more concentrated)"),
                          (axes[1], "entropy_norm", "normalized entropy")):
        pos = np.arange(len(head[key]))
        ax.bar(pos - 0.2, head[key], width=0.4, label=f"head ({head['items']} items)")
        ax.bar(pos + 0.2, tail[key], width=0.4, label=f"tail ({tail['items']} items)")
        ax.set_xticks(pos, [f"L{i}" for i in pos])
        ax.set(ylim=(0, 1), ylabel=key, title=f"Head vs tail: {name}")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)
