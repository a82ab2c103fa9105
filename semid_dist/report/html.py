"""One self-contained HTML page from a version's metrics and its figures.

Inline CSS, every figure embedded as a base64 `data:` URI (the page opens offline, without the
PNG files beside it), and a small script that, once every image has loaded, sets
`document.body.dataset.figuresLoaded = "<loaded>/<total>"` (images with naturalWidth > 0 count
as loaded), so a headless browser can check the page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from semid_dist.summary import decimals, estimated_mark, quantizer_text

TOP_ROUTING_TOKENS = 10

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2733;
  margin:0 auto;max-width:1180px;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;
  border-bottom:1px solid #d6dde5;padding-bottom:4px}h3{font-size:14px;margin:14px 0 6px}
.sub{color:#5b6878;margin:0 0 12px}
.verdict{padding:10px 14px;border-radius:6px;background:#eef5ec;border:1px solid #b9d8b2}
.verdict.alert{background:#fdeeee;border-color:#e5a9a5}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d6dde5;padding:3px 9px;text-align:right}
th{background:#f2f5f8}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.cards>div{flex:1 1 260px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.row>figure{flex:1 1 420px}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #e3e8ee}
figcaption{color:#5b6878;font-size:12px}
"""

SCRIPT = """
(function () {
  function count() {
    var imgs = Array.prototype.slice.call(document.images);
    var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
    var settled = imgs.every(function (i) { return i.complete; });
    if (settled) { document.body.dataset.figuresLoaded = loaded.length + "/" + imgs.length; }
    return settled;
  }
  if (!count()) {
    Array.prototype.forEach.call(document.images, function (i) {
      i.addEventListener("load", count); i.addEventListener("error", count);
    });
    window.addEventListener("load", count);
  }
})();
"""


@dataclass(frozen=True)
class Figure:
    """A rendered figure: file name (`<name>.png`), title, caption and PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes

    @property
    def file(self) -> str:
        return f"{self.name}.png"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return decimals(value, digits, grouped=True)
    return html.escape(str(value))


def residual_note(m: dict[str, Any]) -> str:
    """What the residual norms after each layer are where they are not all alike: a learned
    quantizer's latent residual (`reconstruction.latent_layers`, marked `*`), an incremental
    version's estimates."""
    latent = m["reconstruction"].get("latent_layers", 0)
    note = ("; after the layers marked * it is the learned quantizer's latent residual, "
            "after the last the input's" if latent else "")
    if estimated_mark(m):
        note += "; the figures after every layer but the last are estimated"
    return note


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 4) -> str:
    """An HTML table; the first column is left-aligned, numbers are formatted."""
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>'
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">'
                                    f"{_fmt(v, digits)}</td>" for i, v in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(fig: Figure) -> str:
    """<figure> with the PNG inlined as a data URI and a link to the PNG file beside it."""
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{fig.name}"><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(fig.title)}"><figcaption><b>{html.escape(fig.title)}.</b> '
            f'{html.escape(fig.caption)} (<a href="{fig.file}">{fig.file}</a>)</figcaption>'
            "</figure>")


def _layers_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    keys = (("used", "used"), ("utilization", "util"), ("entropy_norm", "H_norm"),
            ("perplexity", "perplexity"), ("gini", "Gini"), ("top_share", "top share"))
    headers = ["layer", "size"] + [f"{label} {when}" for _, label in keys
                                   for when in ("before", "after")]
    rows = [[f"L{b['layer']}", b["size"]] + [x[key] for key, _ in keys for x in (b, a)]
            for b, a in zip(before, after)]
    return table(headers, rows)


def _collisions_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = (("distinct SIDs", "distinct_sids"), ("unique-SID rate", "unique_sid_rate"),
            ("mean items per SID", "mean_items_per_sid"),
            ("max items per SID", "max_items_per_sid"))
    rows = [[label, before.get(k), after.get(k)] for label, k in keys]
    rows += [[f"items per SID, quantile {q}", before["items_per_sid_quantiles"].get(q), v]
             for q, v in after.get("items_per_sid_quantiles", {}).items()]
    return table(["", "before pruning (full codes)", "after pruning (final SIDs)"], rows)


def _pruning_text(pr: dict[str, Any]) -> str:
    if pr.get("strategy", "none") == "none":
        return "<p>No pruning (prune.strategy=none): final SIDs are the full codes.</p>"
    where = f" at layer {pr['layer']}" if pr.get("layer") is not None else ""
    tokens = ("" if pr["strategy"] == "sarq"  # (it cuts prefixes, not a layer's tokens)
              else f"{_fmt(pr['pruned_tokens'])} tokens pruned, ")
    return (f"<p>Strategy <b>{_fmt(pr['strategy'])}</b>{where}: {tokens}"
            f"{_fmt(pr['items_pruned'])} items get a shorter SID, mean SID "
            f"length {_fmt(pr['mean_sid_length'], 3)}.</p>")


def _conditional_html(conditional: list[dict[str, Any]], layers: int) -> str:
    if layers == 1:  # (a table of headers alone, unexplained)
        return "<p>One layer: no transition from a layer to the next to route.</p>"
    summary = table(
        ["transition", "H(l | l-1)", "H_norm", "mean top share", "children / parent",
         "max in-degree", "mean in-degree"],
        [[f"L{c['from_layer']} → L{c['to_layer']}", c["conditional_entropy"],
          c["conditional_entropy_norm"], c["mean_top_share"], c["mean_children_per_parent"],
          c["in_degree"]["max"], c["in_degree"]["mean_over_used"]] for c in conditional])
    parts = [summary]
    for c in conditional:
        top = c["in_degree"]["top"][:TOP_ROUTING_TOKENS]
        parts.append(f"<h3>Top routing tokens of L{c['to_layer']} (most parents routing in)"
                     "</h3>" + table(["token", "in-degree", "items", "share of items"],
                                     [[f"<L{c['to_layer']}_{t['token']}>", t["in_degree"],
                                       t["items"], t["share"]] for t in top]))
    return "".join(parts)


def _head_tail_table(head: dict[str, Any], tail: dict[str, Any]) -> str:
    def get(part: dict[str, Any], *path: str) -> Any:
        for key in path:
            part = part.get(key) if isinstance(part, dict) else None
        return part

    rows: list[list[Any]] = [["items", head.get("items"), tail.get("items")]]
    for label, path in (("unique-SID rate", ("collisions", "unique_sid_rate")),
                        ("max items per SID", ("collisions", "max_items_per_sid")),
                        ("reconstruction MSE", ("reconstruction", "mse")),
                        ("relative error", ("reconstruction", "relative_error")),
                        ("semantic cohesion", ("quality", "semantic_cohesion")),
                        ("preference discrimination", ("quality", "preference_discrimination"))):
        rows.append([label, get(head, *path), get(tail, *path)])
    for i in range(max(len(head.get("layers", [])), len(tail.get("layers", [])))):
        rows.append([f"L{i} Gini"] + [p["layers"][i]["gini"] if i < len(p.get("layers", []))
                                      else None for p in (head, tail)])
    return table(["", "head", "tail"], rows)


def _overview(m: dict[str, Any]) -> str:
    rows, rec, q, col = m["rows"], m["reconstruction"], m["quality"], m["collisions"]
    est = estimated_mark(m)  # an incremental version's estimates
    cards = [
        "<h3>Rows</h3>" + table(["", "rows"], [["input", rows["input"]],
                                              ["encoded", rows["encoded"]],
                                              ["rejected", rows["rejected"]]]
                                          + ([["carried from the parent", rows["carried"]],
                                              ["replaced in the parent", rows["replaced"]]]
                                             if "carried" in rows else [])),
        "<h3>Final SIDs</h3>" + table(["", ""], [
            ["distinct SIDs", col["distinct_sids"]], ["unique-SID rate", col["unique_sid_rate"]],
            ["max items per SID", col["max_items_per_sid"]]]
            + ([["capacity (collisions.max_per_sid)", col["capacity"]],
                ["items moved to a next-best code", col.get("reassigned")]]
               + ([["items over it (in SIDs)", f"{_fmt(col['over_capacity']['items'])} "
                    f"({_fmt(col['over_capacity']['sids'])})"]] if "over_capacity" in col else [])
               + ([["past it in SIDs pruning cut (not bounded)",
                    f"{_fmt(col['over_capacity']['pruned_items'])} "
                    f"({_fmt(col['over_capacity']['pruned_sids'])})"]]
                  if col.get("over_capacity", {}).get("pruned_sids") else [])
               if col.get("capacity") is not None else [])),
        "<h3>Reconstruction and quality</h3>" + table(["", ""], [
            ["MSE", rec["mse"]], ["relative error" + est, rec["relative_error"]],
            ["semantic cohesion (SC)" + est, q["semantic_cohesion"]],
            ["preference discrimination (PD)" + est, q["preference_discrimination"]],
            ["SC/PD depth, clusters", f"{q['depth']}, {q['clusters']}"]]),
    ]
    return '<div class="cards">' + "".join(f"<div>{c}</div>" for c in cards) + "</div>"


def render(version_id: str, metrics: dict[str, Any], figures: Sequence[Figure], *,
           source: str = "") -> str:
    """The report page of one version. figures: rendered in this order, each placed in the
    section of the same name when there is one (`token_flow`, `pruning`, ...)."""
    m, figs = metrics, {f.name: f for f in figures}
    n_layers = len(m["reconstruction"]["residual_norm_by_layer"])  # (the last: exact)
    latent = m["reconstruction"].get("latent_layers", 0)  # a learned quantizer's
    hg = m.get("hourglass", {})
    pr = m.get("pruning", {})

    def fig(*names: str) -> str:
        return ('<div class="row">' + "".join(figure_html(figs.pop(n)) for n in names
                                              if n in figs) + "</div>")

    body = [
        f"<h1>Semantic ID report — version {html.escape(version_id)}</h1>",
        f'<p class="sub">{html.escape(" · ".join(filter(None, [source, quantizer_text(m)])))}'
        "</p>" if source or quantizer_text(m) else "",
        f'<p class="verdict{" alert" if hg.get("detected") else ""}"><b>Hourglass:</b> '
        f"{html.escape(hg.get('verdict', 'n/a'))}</p>",
        _overview(m), "<h2>Token flow</h2>", fig("token_flow"),
        "<h2>Layers before and after pruning</h2>",
        _layers_table(m["layers"], pr.get("layers_after", m["layers"])),
        fig("rank_frequency", "lorenz"), "<h2>Pruning</h2>", _pruning_text(pr), fig("pruning"),
        "<h2>Collisions</h2>",
        _collisions_table(m.get("collisions_before", m["collisions"]), m["collisions"]),
        table(["prefix depth", "distinct prefixes", "sparsity"],
              [[p["depth"], p["distinct"], p["sparsity"]] for p in m.get("prefixes", [])]),
        fig("sid_sizes"), "<h2>Reconstruction</h2>",
        table(["after layer", "mean ||r||", "mean ||r||^2"],
              [[f"L{i}" + ("*" if i < latent else "")
                + (estimated_mark(m) if i < n_layers - 1 else ""), a, b]
               for i, (a, b) in enumerate(zip(
                  m["reconstruction"]["residual_norm_by_layer"],
                  m["reconstruction"].get("residual_sq_norm_by_layer", [])))]),
        f"<p>{html.escape('Mean residual after each layer' + residual_note(m))}.</p>"
        if residual_note(m) else "",
        fig("residual_norm"), "<h2>Conditional concentration (routing)</h2>",
        _conditional_html(m.get("conditional", []), n_layers),
    ]
    if m.get("head", {}).get("items") and m.get("tail", {}).get("items"):
        moved = ("<p>Of the codes before the capacity moves (collisions.max_per_sid="
                 f"{_fmt(m['collisions']['capacity'])}).</p>"
                 if m["collisions"].get("capacity") is not None else "")
        body += ["<h2>Head vs tail</h2>", moved, _head_tail_table(m["head"], m["tail"]),
                 fig("head_tail")]
    body += [fig(*figs)]  # any figure without a section of its own
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>SID report {html.escape(version_id)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}<script>{SCRIPT}</script></body></html>\n")
