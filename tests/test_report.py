"""Report: figures are valid PNGs on edge-case data, a build writes the page and its figures
into the version, `semid report` renders it again (restoring missing files, never rewriting
committed ones with other bytes; `--out` elsewhere), and every figure loads in headless
Chromium."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from semid_dist.cli import main
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from semid_dist.report import REPORT_HTML
from semid_dist.report import figures as F
from semid_dist.report.html import Figure, render
from semid_dist.summary import counted, format_summary
from tests.conftest import small_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_SRC = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def png_size(data: bytes) -> tuple[int, int]:
    """Check the PNG signature and decode the image; returns (width, height)."""
    from PIL import Image

    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.width > 100 and img.height > 100
        return img.size


def flows(to_layer: list[int], parent: list[int], child: list[int], items: list[int]
          ) -> dict[str, np.ndarray]:
    return {"to_layer": np.array(to_layer, np.int64), "parent": np.array(parent, np.int64),
            "child": np.array(child, np.int64), "items": np.array(items, np.int64)}


THREE_LAYERS = [np.array([5, 3, 0, 2]), np.array([9, 0, 1]), np.array([4, 3, 2, 1, 0, 0])]
THREE_FLOWS = flows([1, 1, 1, 2, 2, 2], [0, 1, 3, 0, 0, 2], [0, 0, 2, 0, 1, 3], [5, 3, 2, 4, 5, 1])
NO_FLOWS = flows([], [], [], [])


@pytest.mark.parametrize("layers, routes", [
    (THREE_LAYERS, THREE_FLOWS),
    ([np.array([7, 0, 0, 1])], NO_FLOWS),  # one layer: nothing to route
    ([np.zeros(4, np.int64), np.zeros(3, np.int64)], NO_FLOWS),  # no items at all
], ids=["three-layers-unused-tokens", "one-layer", "empty"])
def test_distribution_figures_are_pngs(layers, routes):
    pruned = [c > 4 for c in layers]
    for png in (F.token_flow_figure(layers, routes, pruned=pruned),
                F.token_flow_figure(layers, routes, max_edges=1, labels=0),
                F.rank_frequency_figure(layers), F.lorenz_figure(layers),
                F.pruning_figure(layers, [c // 2 for c in layers], strategy="top_k")):
        png_size(png)


def test_other_figures_are_pngs():
    png_size(F.residual_norm_figure([0.7, 0.6, 0.5], [0.5, 0.4, 0.3]))
    png_size(F.residual_norm_figure([0.4]))
    png_size(F.sid_size_figure(np.array([1, 2, 7]), np.array([90, 4, 0]), np.array([80, 6, 1])))
    png_size(F.sid_size_figure(np.zeros(0, np.int64), np.zeros(0, np.int64),
                               np.zeros(0, np.int64)))
    part = {"items": 10, "gini": [0.2, 0.5], "entropy_norm": [0.9, 0.7]}
    png_size(F.head_tail_figure(part, dict(part, items=3)))


def test_every_figure_keeps_its_labels_inside_the_picture(monkeypatch):
    """The figures are placed by fixed margins (no layout engine): with the widest labels a
    catalog gives (counts to 10^8, 4,096-token layers, eight layers, SIDs of a million items
    with slanted bin labels), with counts within one decade (a log axis then labels its
    minor ticks) and with one or two layers, every tick label, axis label, title and legend
    lies inside the picture, none cut off at its edge or drawn outside it, and axes side by
    side keep their labels apart."""
    drawn = []

    def keep(fig):  # each figure as it is saved, for its artists' extents
        drawn.append(fig)
        return png(fig)

    png = F._png
    monkeypatch.setattr(F, "_png", keep)
    rng = np.random.default_rng(3)
    wide = [np.sort(rng.integers(0, 10**8, size=4096))[::-1] for _ in range(8)]
    routes = flows([1] * 4 + [7] * 4, [0, 1, 2, 3] * 2, [3, 2, 1, 0] * 2, [10**8, 5, 4, 3] * 2)
    sizes = 2 ** np.arange(21)
    part = {"items": 10**8, "gini": [0.99] * 8, "entropy_norm": [0.01] * 8}
    F.token_flow_figure(wide, routes, pruned=[c > 10**7 for c in wide])
    F.rank_frequency_figure(wide)
    F.lorenz_figure(wide)
    F.pruning_figure(wide, [c // 3 for c in wide], strategy="top_k")
    F.sid_size_figure(sizes, 10**8 // sizes, 10**8 // sizes)
    F.residual_norm_figure([1e3] * 8, [1e6] * 8)
    F.head_tail_figure(part, dict(part, items=10**7))
    balanced = [rng.integers(4_660, 7_060, size=256) for _ in range(3)]  # within a decade
    F.rank_frequency_figure(balanced)
    F.pruning_figure(balanced, balanced, strategy="drop_layer")
    for layers in (1, 2):
        F.token_flow_figure(balanced[:layers], routes if layers > 1 else NO_FLOWS)
    assert len(drawn) == 11
    for fig in drawn:
        renderer = fig.canvas.get_renderer()
        inside = fig.bbox.padded(-1)  # 1 pixel in from each edge
        box = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
        title = fig.axes[0].get_title()
        assert (box.x0 >= inside.x0 and box.y0 >= inside.y0 and box.x1 <= inside.x1
                and box.y1 <= inside.y1), f"{title!r}: artists span {box}, picture {fig.bbox}"
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]  # side by side, apart
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 < right.x0, f"{title!r}: the axes' labels overlap"


def test_size_bins_sum_the_histogram_into_doubling_bins():
    rng = np.random.default_rng(4)
    size = np.unique(rng.integers(1, 3000, 200))
    before, after = rng.integers(0, 50, len(size)), rng.integers(0, 50, len(size))
    labels, (got_b, got_a) = F.size_bins(size, before, after)
    want_labels, want_b, want_a = [], [], []
    lo, hi = 1, 1
    while lo <= size.max():
        want_labels.append(str(lo) if lo == hi else f"{lo}-{hi}")
        rows = (size >= lo) & (size <= hi)
        want_b.append(int(before[rows].sum()))
        want_a.append(int(after[rows].sum()))
        lo, hi = hi + 1, 2 * hi
    assert labels == want_labels
    assert got_b.tolist() == want_b and got_a.tolist() == want_a
    assert F.size_bins(np.array([1]), np.array([5]))[0] == ["1"]
    assert F.size_bins(np.array([4]), np.array([5]))[1][0].tolist() == [0, 0, 5]


def test_top_edges_keeps_the_heaviest_rows_of_each_transition():
    rng = np.random.default_rng(0)
    to_layer = rng.integers(1, 4, 5000)
    items = rng.permutation(5000)  # distinct, so the top rows are unambiguous
    rows = F.top_edges(to_layer, items, 7)
    for layer in (1, 2, 3):
        expected = np.flatnonzero(to_layer == layer)
        expected = np.sort(expected[np.argsort(-items[expected])[:7]])
        assert rows[to_layer[rows] == layer].tolist() == expected.tolist()
    assert F.top_edges(np.array([1, 1]), np.array([3, 4]), 10).tolist() == [0, 1]
    assert len(F.top_edges(np.zeros(0, np.int64), np.zeros(0, np.int64), 5)) == 0


def _metrics(layers: int = 2) -> dict:
    layer = {"size": 4, "used": 3, "utilization": 0.75, "entropy": 1.0, "entropy_norm": 0.7,
             "perplexity": 2.7, "gini": 0.4, "std": 1.0, "top_share": 0.5}
    col = {"distinct_sids": 5, "unique_sid_rate": 0.5, "mean_items_per_sid": 2.0,
           "max_items_per_sid": 4, "items_per_sid_quantiles": {"0.8": 2, "0.9": 3}}
    return {
        "rows": {"input": 10, "encoded": 10, "rejected": 0},
        "layers": [dict(layer, layer=i) for i in range(layers)],
        "prefixes": [{"depth": 1, "distinct": 3, "sparsity": 0.75}],
        "conditional": [], "hourglass": {"detected": True, "verdict": "hourglass at <layer 1>"},
        "collisions": col, "collisions_before": col,
        "reconstruction": {"mse": 0.1, "relative_error": 0.2,
                           "residual_norm_by_layer": [0.5] * layers},
        "quality": {"depth": 1, "clusters": 3, "semantic_cohesion": None,
                    "preference_discrimination": -1.0},
        "pruning": {"strategy": "none"},
    }


def test_page_without_head_tail_embeds_every_figure_and_escapes_text():
    figs = [Figure(name, name, "caption <b>", F.residual_norm_figure(norms))
            for name, norms in (("token_flow", [1.0, 0.5]), ("residual_norm", [2.0, 0.1]),
                                ("extra", [0.3, 0.2, 0.1]))]
    assert len({f.png for f in figs}) == 3
    page = render("v1", _metrics(), figs)
    assert [base64.b64decode(s) for s in IMG_SRC.findall(page)] == [f.png for f in figs]
    assert "hourglass at &lt;layer 1&gt;" in page and "caption &lt;b&gt;" in page
    assert "Head vs tail" not in page and "figuresLoaded" in page
    one = render("v1", _metrics(layers=1), [])  # (a table of headers alone, unexplained)
    assert "One layer: no transition from a layer to the next to route." in one
    assert "H(l | l-1)" not in one


def test_page_and_summary_say_what_their_figures_are_of():
    """A learned quantizer's latent residual norms are marked, head / tail figures under a
    capacity bound are said to be of the codes before its moves, a figure below the
    shown precision is not 0.0000, a one-layer head line names L0's Gini, and the drift
    line counts the changed SIDs beside the share."""
    m = _metrics(3)
    m["reconstruction"].update(latent_layers=2, mse=3e-05,
                               residual_sq_norm_by_layer=[0.4, 0.2, 3e-05])
    part = {"items": 5, "layers": m["layers"][:1], "collisions": m["collisions"],
            "reconstruction": m["reconstruction"], "quality": m["quality"]}
    m.update(head=part, tail=part, collisions=dict(m["collisions"], capacity=4, reassigned=7,
                                                   over_capacity={"sids": 2, "items": 3}))
    figs = [Figure("residual_norm", "Residual norm per layer", "c",
                   F.residual_norm_figure([0.5] * 3, latent_layers=2))]
    page = render("v1", m, figs)
    assert "<td class=\"l\">L0*</td>" in page and "<td class=\"l\">L1*</td>" in page
    assert "<td class=\"l\">L2</td>" in page and "latent residual" in page
    assert "3.000e-05" in page and "0.0000<" not in page
    assert "Of the codes before the capacity moves (collisions.max_per_sid=4)" in page
    assert "items over it (in SIDs)</td><td class=\"\">3 (2)</td>" in page  # what it left over
    assert "<td class=\"l\">mean items per SID</td>" in page  # (its key before)
    assert F.residual_norm_figure([0.5] * 3, latent_layers=2) != F.residual_norm_figure(
        [0.5] * 3)
    text = format_summary("v1", "/p", m, {
        "from_version": "v0", "to_version": "v1", "share_changed": 0.00003, "changed": 3,
        "items_common": 100_000, "items_only_from": 0, "items_only_to": 0,
        "layers": [{"layer": 0, "share_changed": 0.0}]})
    head = next(line for line in text.splitlines() if line.startswith("head"))
    assert ("capacity  at most 4 per SID: 7 items moved to a next-best code, 3 items in 2 "
            "SIDs over it (no candidate code had room)") in text
    assert " L0 gini 0.4000 (before capacity moves)" in head
    assert "0.00% of 100000 common items changed SID (3; per layer 0.00%)" in text
    assert "recon     mse 0.000030  relative error" in text
    for mse, shown in ((0.390975, "0.390975"), (0.0, "0.000000"), (2.3e34, "2.30000e+34"),
                       (123456.5, "123456.500000"), (4e-7, "4.00000e-07"), (-0.0, "0.000000")):
        m["reconstruction"]["mse"] = mse
        assert f"recon     mse {shown}  relative" in format_summary("v1", "/p", m, None)
    m["quality"].update(semantic_cohesion=1.0, preference_discrimination=-0.0)
    assert "quality   SC 1.0000  PD 0.0000  " in format_summary("v1", "/p", m, None)


# ---------------------------------------------------------------- a real build and its page


@pytest.fixture(scope="module")
def built(small_catalog, tmp_path_factory) -> tuple[TableStore, str]:
    catalog, _ = small_catalog
    root = str(tmp_path_factory.mktemp("report") / "out")
    cfg = small_config(catalog, root, input__popularity_column="popularity",
                       prune__strategy="top_k", prune__k=2)
    res = build(cfg, log=lambda msg: None)
    return TableStore(root, "sids"), res.version_id


def _report_files(store: TableStore, vid: str) -> dict[str, dict]:
    return {e["path"]: e for e in store.manifest(vid)["files"] if e["path"].startswith("report/")}


def test_build_writes_report_with_figures_equal_to_png_files(built):
    store, vid = built
    listed = _report_files(store, vid)
    pngs = sorted(p for p in listed if p.endswith(".png"))
    assert REPORT_HTML in listed and len(pngs) == 7  # six figures + head vs tail
    vdir = Path(store.version_dir(vid))
    for path, entry in listed.items():
        assert hashlib.sha256((vdir / path).read_bytes()).hexdigest() == entry["sha256"]
    page = (vdir / REPORT_HTML).read_text(encoding="utf-8")
    embedded = [base64.b64decode(s) for s in IMG_SRC.findall(page)]
    assert len(embedded) == page.count("<img ") == len(pngs)
    files = {(vdir / p).read_bytes() for p in pngs}
    assert set(embedded) == files
    for data in embedded:
        png_size(data)
    for needle in ("Hourglass:", "Head vs tail", "Top routing tokens", "rejected",
                   "before pruning (full codes)", "semantic cohesion"):
        assert needle in page


@pytest.mark.parametrize("relative", [False, True])
def test_cli_report_restores_missing_files_with_the_committed_bytes(copied, capsys,
                                                                    monkeypatch, relative):
    store, vid = copied  # (a copy: the module's built version stays whole for the others)
    vdir = Path(store.version_dir(vid))
    manifest = (vdir / "_manifest.json").read_bytes()
    listed = _report_files(store, vid)
    gone = sorted(listed)[::2]
    for path in gone:
        (vdir / path).unlink()
    kept = {p: (vdir / p).stat().st_mtime_ns for p in listed if p not in gone}
    root = store.root
    if relative:  # the page names the table's absolute path however --root is given
        monkeypatch.chdir(Path(root).parent)
        root = Path(root).name
    assert main(["report", "--root", root, "--table", "sids", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"] == f"{store.version_url(vid)}/{REPORT_HTML}"
    assert main(["versions", "show", "--root", root, "--table", "sids"]) == 0
    assert f"path      {store.version_url(vid)}\n" in capsys.readouterr().out  # (absolute too)
    assert sorted(out["written"]) == [f"{store.version_url(vid)}/{p}" for p in gone]
    for path, entry in _report_files(store, vid).items():  # deterministic: same bytes again
        assert hashlib.sha256((vdir / path).read_bytes()).hexdigest() == entry["sha256"]
    assert {p: (vdir / p).stat().st_mtime_ns for p in kept} == kept  # intact: not rewritten
    assert (vdir / "_manifest.json").read_bytes() == manifest
    assert main(["report", "--root", store.root, "--table", "sids", "--version", "nope"]) == 2
    capsys.readouterr()
    folder = vdir / "report"
    folder.rename(vdir / "report-aside")
    folder.write_text("a file where the report folder was")  # unwritable, as a read-only store
    try:
        assert main(["report", "--root", root, "--table", "sids"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"semid report: error: cannot write the report of version {vid}")
        assert "give --out a folder of its own" in err and len(err.splitlines()) == 1
    finally:
        folder.unlink()
        (vdir / "report-aside").rename(folder)


@pytest.fixture
def copied(built, tmp_path) -> tuple[TableStore, str]:
    """A copy of the built table, for tests that edit its committed files."""
    store, vid = built
    shutil.copytree(Path(store.root), tmp_path / "out")
    return TableStore(str(tmp_path / "out"), "sids"), vid


def _recommit(store: TableStore, vid: str, rel: str, data: bytes) -> None:
    """Replace a committed file and its manifest checksum together: the version as another
    release (or a hand edit that kept the checksums in step) committed it."""
    vdir = Path(store.version_dir(vid))
    (vdir / rel).write_bytes(data)
    body = json.loads((vdir / "_manifest.json").read_text())
    for entry in body["files"]:
        if entry["path"] == rel:
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (vdir / "_manifest.json").write_text(json.dumps(body))


def test_cli_report_never_rewrites_a_committed_report_with_other_bytes(copied, capsys,
                                                                       tmp_path):
    store, vid = copied
    vdir = Path(store.version_dir(vid))
    older = b"<html>a report of another release</html>"
    _recommit(store, vid, REPORT_HTML, older)
    args = ["report", "--root", store.root, "--table", "sids"]
    # intact as committed: nothing to restore, and nothing rendered to find that out
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == []
    png = next(p for p in _report_files(store, vid) if p.endswith(".png"))
    kept = (vdir / png).read_bytes()
    (vdir / png).unlink()  # a file to restore: this release renders the page otherwise
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"semid report: error: version {vid}'s report renders to other bytes than "
                   "the version was committed with (1 of 8 files: built by another release of "
                   "semid_dist or matplotlib, with other fonts, or with no report); a committed "
                   "version's files are not rewritten: give --out DIR to write this render to "
                   "a folder of its own")
    assert (vdir / REPORT_HTML).read_bytes() == older and not (vdir / png).exists()
    (vdir / png).write_bytes(kept)
    out = tmp_path / "elsewhere"
    assert main([*args, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    pngs = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert printed["report"] == f"{out}/report.html" and len(pngs) == 7
    assert sorted(printed["written"]) == sorted(f"{out}/{n}" for n in [*pngs, "report.html"])
    for name in pngs:  # the figures render as committed; the page is this release's
        assert (out / name).read_bytes() == (vdir / "report" / name).read_bytes()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"sids/versions/{vid}" in page and "Hourglass:" in page
    assert (vdir / REPORT_HTML).read_bytes() == older
    assert main([*args, "--out", str(out)]) == 0  # the same render again: the same bytes
    capsys.readouterr()
    theirs = tmp_path / "theirs"  # a folder holding a page of the user's: not written over
    theirs.mkdir()
    (theirs / "report.html").write_text("mine")
    (theirs / pngs[0]).write_bytes((out / pngs[0]).read_bytes())  # (the same bytes: no matter)
    assert main([*args, "--out", str(theirs)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"semid report: error: --out {theirs} already holds report.html with other content "
        "(another version's report, or files of yours); give an empty folder, or add "
        "--overwrite to write over them")
    assert sorted(p.name for p in theirs.iterdir()) == sorted(["report.html", pngs[0]])
    assert (theirs / "report.html").read_text() == "mine"
    assert main([*args, "--out", str(theirs), "--overwrite"]) == 0
    capsys.readouterr()
    assert (theirs / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert main([*args, "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (
        "semid report: error: --overwrite goes with --out DIR (the version's own report "
        "files are restored, never written over)")
    for inside in (vdir / "report", Path(store.root) / "sids"):
        assert main([*args, "--out", str(inside)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"semid report: error: --out {inside} is inside the table {store.root}/sids, "
            "whose files only its builds write: give a folder outside it")
    (tmp_path / "afile").write_text("x")
    assert main([*args, "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"semid report: error: cannot write the report of version {vid} "
                          f"into --out {tmp_path / 'afile'} (") and len(err.splitlines()) == 1
    assert err.endswith("give --out a folder that can be written")


@pytest.mark.parametrize("metrics", [b"[1, 2]", b"{}", b'{"rows": 3}', json.dumps({
    "rows": {}, "layers": [], "reconstruction": {"residual_norm_by_layer": []}, "quality": {},
    "collisions": {}}).encode()])
def test_cli_report_names_a_metrics_file_of_another_form(copied, capsys, tmp_path, metrics):
    """A metrics.json that passes its checksum (edited along with the manifest) but is not a
    metrics object of this release: a named error, not a KeyError or TypeError traceback."""
    store, vid = copied
    _recommit(store, vid, "metrics.json", metrics)
    show = ["versions", "show", "--root", store.root, "--table", "sids"]  # (it was a traceback)
    assert main(show) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"semid versions show: error: version {vid}'s metrics.json is not in the "
                          "form this semid_dist reads (")
    assert err.endswith("): it was edited, or written by another release; --json prints it "
                        "as it is") and len(err.splitlines()) == 1
    assert main([*show, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == json.loads(metrics)
    (Path(store.version_dir(vid)) / REPORT_HTML).unlink()  # (a file to restore: rendered)
    for extra in ([], ["--out", str(tmp_path / "r")]):
        assert main(["report", "--root", store.root, "--table", "sids", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"semid report: error: version {vid}'s metrics.json is not in "
                              "the form this semid_dist reads (")
        assert err.endswith("): it was edited, or written by another release; rebuild the "
                            "version to get a report") and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of a headless-capable Chromium; skips (before any build) when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium not installed (apt-get install chromium); CI installs it")


def test_every_figure_loads_in_headless_chromium(chromium, built, tmp_path):
    store, vid = built
    page = Path(store.version_dir(vid)) / REPORT_HTML
    n = sum(p.endswith(".png") for p in _report_files(store, vid))
    assert n >= 6
    out = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.search(r'data-figures-loaded="(\d+)/(\d+)"', out.stdout)
    assert found, f"page never reported its figures as loaded: {out.stderr[-2000:]}"
    assert found.groups() == (str(n), str(n))


def test_cli_report_does_not_restore_files_into_a_version_gc_removed(copied, small_catalog,
                                                                     capsys, monkeypatch):
    """A `versions gc` that removes the version between the render and the restore: the
    restore would bring its folder back (report files and nothing else)."""
    from semid_dist.report import writer

    store, vid = copied
    catalog, _ = small_catalog
    build(small_config(catalog, store.root, input__popularity_column="popularity", seed=8),
          log=lambda msg: None)  # a newer version: gc may remove `vid`
    (Path(store.version_dir(vid)) / REPORT_HTML).unlink()
    render = writer.render_report

    def gc_meanwhile(store_, version_id):
        files = render(store_, version_id)
        store_.gc(0, min_age_hours=0)
        return files

    monkeypatch.setattr(writer, "render_report", gc_meanwhile)
    assert main(["report", "--root", store.root, "--table", "sids", "--version", vid]) == 2
    err = capsys.readouterr().err.strip()  # (the manifest's read says it)
    assert len(err.splitlines()) == 1 and vid in err and (
        "does not exist (never built, or removed by `semid versions gc`)" in err), err
    assert not Path(store.version_dir(vid)).exists() and vid not in store.versions()


def test_counts_in_lines_take_the_noun_s_number():
    """`plan: 800 rows in 1 shard`, `1 item id occurs more than once` (it read `1 shards`,
    `1 item ids occur`)."""
    assert [counted(n, "shard") for n in (0, 1, 2)] == ["0 shards", "1 shard", "2 shards"]
    assert counted(1, "item id occurs", "item ids occur") == "1 item id occurs"
    assert counted(4, "item id occurs", "item ids occur") == "4 item ids occur"
