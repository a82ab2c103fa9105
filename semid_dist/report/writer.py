"""Render the report of one version from its own files, through the store.

Reads metrics.json and analytics/*.parquet with `TableStore.read_bytes`, which takes a version
id directly, so it works on a version that is still being built (before its manifest) as well
as on a committed one. A build writes `report/report.html` and `report/<figure>.png` into
its version; `semid report` renders them again (`rerender_report`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.errors import StoreError, one_line
from semid_dist.io import fs as fsio
from semid_dist.io.store import FileEntry, TableStore, removed_while_read
from semid_dist.report import figures as F
from semid_dist.report.html import Figure, render, residual_note
from semid_dist.summary import METRICS_FORM_ERRORS, other_form

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


# the sections of metrics.json the report reads, and their JSON types
_METRICS_FORM = {"rows": dict, "layers": list, "reconstruction": dict, "quality": dict,
                 "collisions": dict}


def _not_metrics(metrics: Any) -> str | None:
    """Why `metrics` is not a metrics object the report reads, or None."""
    if not isinstance(metrics, dict):
        return f"a JSON {type(metrics).__name__}, not an object"
    for key, kind in _METRICS_FORM.items():
        if not isinstance(metrics.get(key), kind):
            return f"no {key} {'object' if kind is dict else 'list'}"
    if not isinstance(metrics["reconstruction"].get("residual_norm_by_layer"), list):
        return "no reconstruction.residual_norm_by_layer list"
    return None


def _other_form(vid: str, why: str) -> StoreError:
    return other_form(vid, why, "rebuild the version to get a report")


def load_version(store: TableStore, vid: str) -> VersionData:
    """Read metrics.json and the analytics tables of version `vid` (committed or not)."""
    try:
        metrics = json.loads(_read(store, vid, "metrics.json"))
    except ValueError as exc:
        raise StoreError(f"version {vid} of table {store.url!r}: metrics.json cannot be read "
                         f"({exc}); the version is damaged: rebuild it") from None
    if (why := _not_metrics(metrics)) is not None:  # (it passed its checksum: edited with it)
        raise _other_form(vid, why)
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
               "parent → child routes, width by items; red tokens lose more than half of "
               "their items to pruning.",
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
               "encode after each layer" + residual_note(m) + ".", F.residual_norm_figure(
                   rec["residual_norm_by_layer"], rec.get("residual_sq_norm_by_layer"),
                   latent_layers=rec.get("latent_layers", 0))),
    ]
    if strategy == "none":  # (its two panels would be the same)
        figs = [f for f in figs if f.name != "pruning"]
    head_tail = _head_tail(data)
    return figs + ([head_tail] if head_tail else [])


def render_report(store: TableStore, version_id: str) -> dict[str, bytes]:
    """The report files of `version_id`, rendered from its metrics.json and analytics tables:
    `report/<figure>.png` per figure, then `report/report.html`, by path in the version."""
    data = load_version(store, version_id)
    figs = make_figures(data)
    # the version's place in its table, not the root's: a re-render of a moved or copied
    # table gives the bytes its manifest holds
    page = render(version_id, data.metrics, figs, source=f"{store.table}/versions/{version_id}")
    return {**{f"{REPORT_DIR}/{f.file}": f.png for f in figs}, REPORT_HTML: page.encode("utf-8")}


def write_report(store: TableStore, version_id: str) -> list[FileEntry]:
    """Render the report of the version being built and write its files into it; returns
    their entries (PNG files first, the page last)."""
    return [store.write_file(version_id, rel, data)
            for rel, data in render_report(store, version_id).items()]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rerender_report(store: TableStore, version_id: str, out: str | None = None, *,
                    overwrite: bool = False) -> list[str]:
    """`semid report`: render the report of committed version `version_id` again; returns the
    URLs of the files written. With `out` (a folder, any fsspec URL) they go there, as
    `report.html` and the PNG files; a file of those names already there with other bytes
    (another version's report, or a file of the user's) is a StoreError naming it, written
    over only with `overwrite`. Without it they go into the version, but only where
    the render gives the bytes its manifest records: a missing or damaged report file is
    restored, an intact one left as it is. A render that differs (another release of the
    renderer or of matplotlib, other fonts; a version with no report in its manifest) is a
    StoreError saying to give `out`: a committed version's files are never rewritten with
    other bytes. Where every report file the manifest records is intact, nothing is
    rendered (nor written: a read-only store, a version of another release). A file that
    cannot be written is a StoreError naming where."""
    if out is None and _report_intact(store, version_id):
        return []
    try:
        files = render_report(store, version_id)
    except METRICS_FORM_ERRORS as exc:
        # a committed metrics.json whose sections hold another form inside them (a build's
        # own render, from the metrics it computed, is not caught: an error there is a bug)
        raise _other_form(version_id, f"{type(exc).__name__}: {exc}") from exc
    if out is not None:
        fs, folder = fsio.resolve(out)
        names = {rel: rel.removeprefix(f"{REPORT_DIR}/") for rel in files}
        with _writing(version_id, f"--out {fsio.redact_url(out)}", "give --out a folder that "
                      "can be written"):
            if not overwrite:
                _check_out_free(fs, folder, out, {names[r]: data for r, data in files.items()})
            for rel, data in files.items():
                fsio.write_bytes(fs, fsio.join(folder, names[rel]), data)
        return [f"{fsio.redact_url(out.rstrip('/'))}/{name}" for name in names.values()]
    recorded = {e.get("path"): e.get("sha256") for e in store.manifest(version_id)["files"]
                if isinstance(e, dict) and str(e.get("path", "")).startswith(f"{REPORT_DIR}/")}
    differ = {rel for rel, data in files.items() if recorded.get(rel) != _sha256(data)}
    if differ := differ | (recorded.keys() - files.keys()):
        raise StoreError(
            f"version {version_id}'s report renders to other bytes than the version was "
            f"committed with ({len(differ)} of {len(recorded.keys() | files.keys())} files: "
            "built by another release of semid_dist or matplotlib, with other fonts, or with "
            "no report); a committed version's files are not rewritten: give --out DIR to "
            "write this render to a folder of its own")
    missing = [rel for rel, data in files.items() if not _holds(store, version_id, rel, data)]
    if missing and not store.is_committed(version_id):
        raise removed_while_read(version_id)  # (restoring would bring back its folder)
    with _writing(version_id, f"{store.display_url(version_id)}/{REPORT_DIR}", "run semid "
                  "report where the table can be written, or give --out a folder of its own"):
        for rel in missing:
            store.write_file(version_id, rel, files[rel])
    return [f"{store.display_url(version_id)}/{rel}" for rel in missing]


def _check_out_free(fs: Any, folder: str, out: str, files: dict[str, bytes]) -> None:
    """Refuse to write over files in `out` (by name: the report's files) that hold other
    bytes than this render's: `semid report --out` into a folder that holds another
    version's report replaced it without a word. The same bytes (the same version rendered
    again) are written again."""
    taken = []
    for name, data in files.items():
        try:
            held = fs.cat_file(fsio.join(folder, name))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except IsADirectoryError:
            held = None
        if held != data:
            taken.append(name)
    if taken:
        shown = ", ".join(sorted(taken)[:3]) + (f" and {len(taken) - 3} more"
                                                if len(taken) > 3 else "")
        raise StoreError(f"--out {fsio.redact_url(out)} already holds {shown} with other "
                         "content (another version's report, or files of yours); give an "
                         "empty folder, or add --overwrite to write over them")


def _report_intact(store: TableStore, version_id: str) -> bool:
    """Whether the version's manifest records report files and each holds the bytes it
    records (read, not rendered)."""
    recorded = [(e.get("path"), e.get("sha256")) for e in store.manifest(version_id)["files"]
                if isinstance(e, dict) and str(e.get("path", "")).startswith(f"{REPORT_DIR}/")]
    for rel, sha in recorded:
        try:
            held = store.fs.cat_file(fsio.join(store.version_dir(version_id), rel))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        if _sha256(held) != sha:
            return False
    return bool(recorded)


def _holds(store: TableStore, version_id: str, rel: str, data: bytes) -> bool:
    """Whether the version's file `rel` holds `data` (missing, or another file where its
    folder goes: no)."""
    try:
        return store.fs.cat_file(fsio.join(store.version_dir(version_id), rel)) == data
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False


@contextmanager
def _writing(version_id: str, where: str, fix: str) -> Iterator[None]:
    """A write that fails (a read-only store, a file where the folder goes) as a StoreError
    naming `where` and `fix`."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"cannot write the report of version {version_id} into {where} "
                         f"({one_line(exc)}); {fix}") from None
