"""Human-readable summary of a committed version (printed at the end of a build)."""

from __future__ import annotations

import math
from typing import Any

from semid_dist.errors import StoreError

# what a summary or a report of a committed metrics.json whose form is another release's
# (or an edit's) raises, where reading it does
METRICS_FORM_ERRORS = (KeyError, TypeError, IndexError, AttributeError, ValueError)


def other_form(vid: str, why: str, fix: str, file: str = "metrics.json") -> StoreError:
    """A committed `file` (its checksum passed) this release cannot read: `why`."""
    return StoreError(f"version {vid}'s {file} is not in the form this semid_dist "
                      f"reads ({why}): it was edited, or written by another release; {fix}")


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 shard`, `2 shards` (`plural`: where it is not noun + "s")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def quantizer_text(metrics: dict[str, Any]) -> str | None:
    """`rq_kmeans 256 x 256 x 256` (`acrq on rq_vae ...`), or None for a version of an older
    release, whose metrics do not say."""
    q = metrics.get("quantizer")
    if not q:
        return None
    base = f" on {q['base']}" if q.get("base") else ""
    return f"{q['method']}{base} {' x '.join(str(k) for k in q['layers'])}"


def quantizer_line(metrics: dict[str, Any]) -> list[str]:
    text = quantizer_text(metrics)
    return [f"quantizer {text}"] if text else []


def capacity_line(col: dict[str, Any], incremental: bool = False) -> list[str]:
    """The capacity bound's line (none without one): the items it moved and those it left
    over it (a version of an older release: the moves alone); `incremental`: its carried
    items, never moved, may be among them."""
    if col.get("capacity") is None:
        return []
    over = col.get("over_capacity")
    left = (f", {counted(over['items'], 'item')} in {counted(over['sids'], 'SID')} over it (no "
            f"candidate code had room{', or carried' if incremental else ''})"
            if over and over["sids"] else
            ", none over it" if over else "")
    if over and over.get("pruned_sids"):
        left += (f"; {counted(over['pruned_items'], 'item')} past it in "
                 f"{counted(over['pruned_sids'], 'SID')} pruning cut before the last layer "
                 "(not bounded)")
    return [f"capacity  at most {col['capacity']} per SID: "
            f"{counted(col.get('reassigned', 0), 'item')} moved to a next-best code{left}"]


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v + 0.0:.4f}"  # (+ 0.0: -0.0 reads 0.0000)


def decimals(value: float, digits: int, *, upper: float = math.inf, grouped: bool = False
             ) -> str:
    """`value` to `digits` decimals (`grouped`: with thousands separators), or in e-notation
    where those would show a value other than 0 as 0 or, from `upper` on, run long (the MSE
    of embeddings of huge values); -0.0 reads 0."""
    if value != 0 and not 0.5 * 10.0 ** -digits <= abs(value) < upper:
        return f"{value:.{digits - 1}e}"
    return f"{value + 0.0:{',' if grouped else ''}.{digits}f}"


def _mse(v: float) -> str:
    return decimals(v, 6, upper=1e6)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def format_drift_line(drift: dict[str, Any]) -> str:
    """One line: overall and per-layer share of changed SIDs (over the items in both
    versions) and the items in only one of them."""
    layers = " / ".join(_pct(layer["share_changed"]) if layer.get("in_both", True)
                        else "- (one version's only)" for layer in drift["layers"])
    return (f"vs {drift['from_version']}: {_pct(drift['share_changed'])} of "
            f"{drift['items_common']} common items changed SID ({drift['changed']}; per "
            f"layer {layers}); "
            f"{drift['items_only_from']} only in {drift['from_version']}, "
            f"{drift['items_only_to']} only in {drift['to_version']}")


def format_drift(drift: dict[str, Any]) -> str:
    """`semid versions diff` text output."""
    lines = [f"from      {drift['from_version']}", f"to        {drift['to_version']}",
             f"items     common {drift['items_common']}  only in from "
             f"{drift['items_only_from']}  only in to {drift['items_only_to']}",
             f"changed   {drift['changed']} of {drift['items_common']} common items' SIDs "
             f"({_pct(drift['share_changed'])})",
             "layer  changed  share"]
    lines += [f"{layer['layer']:>5}  {layer['changed']:>7}  {_pct(layer['share_changed'])}"
              if layer.get("in_both", True) else
              f"{layer['layer']:>5}        -  -      (a layer of one version only: "
              f"{drift.get('layers_from')} layers in from, {drift.get('layers_to')} in to)"
              for layer in drift["layers"]]
    return "\n".join(lines)


def format_gc(report: dict[str, Any]) -> str:
    """`semid versions gc` text output."""
    verb = "would delete" if report["dry_run"] else "deleted"
    young = ", ".join(report["deleted_uncommitted"]) or "-"
    lines = [f"table     {report['table']}  (_latest {report['latest'] or 'none'})",
             f"{verb} {len(report['deleted'])} committed version(s): "
             f"{', '.join(report['deleted']) or '-'}",
             f"{verb} {len(report['deleted_uncommitted'])} uncommitted director(ies) older "
             f"than {report['min_age_hours']:g} h: {young}",
             f"kept      {len(report['kept'])} committed: {', '.join(report['kept']) or '-'}",
             *(f"          {vid} beyond --keep {report['keep']}: {why}"
               for vid, why in report.get("kept_because", {}).items()),
             f"kept      {len(report['kept_uncommitted'])} uncommitted (younger than "
             f"{report['min_age_hours']:g} h, or their build still runs): "
             f"{', '.join(report['kept_uncommitted']) or '-'}"]
    if report["staging_removed"]:
        lines.append(f"{'would remove' if report['dry_run'] else 'removed'} the work files "
                     "(_staging) a killed build left in committed version(s): "
                     + ", ".join(report["staging_removed"]))
    return "\n".join(lines)


def estimated_mark(metrics: dict[str, Any]) -> str:
    """' (estimated)' where an incremental version's relative error, residual norms and
    quality are estimates (`metrics.incremental.estimated`), else ''."""
    return " (estimated)" if (metrics.get("incremental") or {}).get("estimated") else ""


def format_summary(version_id: str, path: str, metrics: dict[str, Any],
                   drift: dict[str, Any] | None = None) -> str:
    """The build / `semid versions show` summary; `drift` (drift.json, against the parent)
    adds a line, as does a drift the build could not measure (`metrics.drift_skipped`)."""
    rows = metrics["rows"]
    col = metrics["collisions"]
    rec = metrics["reconstruction"]
    q = metrics["quality"]
    lines = [
        f"version   {version_id}",
        f"path      {path}",
        f"rows      input {rows['input']}  encoded {rows['encoded']}  "
        f"rejected {rows['rejected']}" + (
            f"  carried {rows['carried']} from the parent (replaced {rows['replaced']})"
            if "carried" in rows else ""),
        *quantizer_line(metrics),
        "layer  size  used  util    H_norm  gini    top_share"
        + ("  (of the full codes, before pruning)"
           if metrics.get("pruning", {}).get("strategy", "none") != "none" else ""),
    ]
    for layer in metrics["layers"]:
        lines.append(f"{layer['layer']:>5}  {layer['size']:>4}  {layer['used']:>4}  "
                     f"{layer['utilization']:.4f}  {layer['entropy_norm']:.4f}  "
                     f"{layer['gini']:.4f}  {layer['top_share']:.4f}")
    pr = metrics.get("pruning", {})
    if pr.get("strategy", "none") != "none":
        before = metrics["collisions_before"]
        tokens = ("" if pr["strategy"] == "sarq"  # (it cuts prefixes, not a layer's tokens)
                  else f"{pr['pruned_tokens']} tokens, ")
        lines.append(f"pruning   {pr['strategy']}: {tokens}"
                     f"{pr['items_pruned']} items shortened, mean SID length "
                     f"{pr['mean_sid_length']:.3f} (unique-SID rate before "
                     f"{before['unique_sid_rate']:.4f})")
    lines += [
        f"SIDs      distinct {col['distinct_sids']}  unique-SID rate "
        f"{col['unique_sid_rate']:.4f}  max items/SID {col['max_items_per_sid']}",
        *capacity_line(col, incremental="incremental" in metrics),
        f"recon     mse {_mse(rec['mse'])}  relative error {rec['relative_error']:.4f}"
        + estimated_mark(metrics),
        f"quality   SC {_fmt(q['semantic_cohesion'])}  PD {_fmt(q['preference_discrimination'])}"
        f"  (depth {q['depth']})" + estimated_mark(metrics),
    ]
    moved = " (before capacity moves)" if col.get("capacity") is not None else ""
    for part in ("head", "tail"):
        sub = metrics.get(part)
        if sub and sub.get("items"):
            at = min(1, len(sub["layers"]) - 1)  # L1's, or a one-layer quantizer's L0
            lines.append(f"{part:<9} {sub['items']} items  unique-SID rate "
                         f"{sub['collisions']['unique_sid_rate']:.4f}  mse "
                         f"{_mse(sub['reconstruction']['mse'])}  L{at} gini "
                         f"{sub['layers'][at]['gini']:.4f}{moved}")
    if "hourglass" in metrics:
        lines.append(f"hourglass {metrics['hourglass']['verdict']}")
    if drift:
        lines.append(f"drift     {format_drift_line(drift)}")
    elif skipped := metrics.get("drift_skipped"):
        lines.append(f"drift     skipped against {skipped['parent']}: {skipped['reason']}")
    return "\n".join(lines)
