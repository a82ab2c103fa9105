"""`semid` command line. No engine is imported at module top: `semid validate` and
`semid versions` work without Ray or Spark.

Exit status 0 on success; on failure a one-line reason on stderr and a non-zero status
(2 for bad config / input / store errors, 1 for anything unexpected, 130 for Ctrl-C, 143 for
SIGTERM); output
cut short by a closed pipe (`| head`) ends quietly with 141, as if killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import posixpath
import re
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from semid_dist.errors import (
    ConfigError,
    NothingToEncode,
    SemidError,
    StoreError,
    one_line,
    wrapped_errors,
)
from semid_dist.signals import exiting_signals, interrupt_raised, one_interrupt, terminated

if TYPE_CHECKING:
    from semid_dist.io.store import TableStore


class _StdoutClosed(Exception):
    """Whoever read this command's output has gone (`semid versions list | head -1`)."""


def _out(text: str) -> None:
    """Print a line of the command's output now (a closed stdout: _StdoutClosed)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise _StdoutClosed from None


def _print(obj: Any, as_json: bool, text: str) -> None:
    _out(json.dumps(obj, indent=2, default=str) if as_json else text)


def cmd_build(args: argparse.Namespace) -> int:
    from semid_dist.config import changed_settings, load_config
    from semid_dist.pipeline import build, make_logger
    from semid_dist.summary import format_summary

    cfg = load_config(args.config, args.overrides)
    log = make_logger()
    log(f"config: {changed_settings(cfg)} (the rest default)")
    log("config: resolved " + json.dumps(cfg.to_dict(), separators=(",", ":")))
    try:
        if args.dry_run:
            from semid_dist.plan import dry_run

            plan = dry_run(cfg, log=log)
            _print(plan, args.json, _dry_run_text(plan))
            return 0
        with _stdout_to_stderr():
            result = build(cfg, log=log)
    except NothingToEncode as exc:  # an empty delta under encode.empty_delta: skip
        _print({"version_id": None, "nothing_to_encode": str(exc)}, args.json, str(exc))
        return 0
    args.committed = result.version_id  # an interrupt from here on must not deny it
    _print({"version_id": result.version_id, "path": result.path, "metrics": result.metrics,
            "drift": result.drift}, args.json,
           format_summary(result.version_id, result.path, result.metrics, result.drift))
    return 0


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """stdout holds a build's summary (or --json) alone: whatever else is printed while the
    build runs goes to stderr, with its progress: Python's writes (Ray's relayed lines of a
    dead worker or of an attached cluster came before the JSON) and, where stdout is a
    file descriptor, the process's own (a JVM's, a C library's)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # (no descriptor 1 to move: Python's writes only)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _dry_run_text(plan: dict[str, Any]) -> str:
    """`semid build --dry-run`'s lines (`plan.dry_run`'s findings)."""
    if plan["codebooks"] != "fit":
        books = f"those of version {plan['codebooks']}"
    elif plan["warm_start"]:
        books = f"fit new ones, starting from version {plan['warm_start']}'s (fit.warm_start)"
    else:
        books = "fit new ones"
    if plan["codebooks"] == "fit" and plan["resuming"]:
        books += " (or those the unfinished run wrote)"
    if plan["incremental"]:
        what = f"an incremental version extending {plan['parent']}"
    else:
        what = f"a version with parent {plan['parent'] or 'none'}"
    if plan["resuming"]:
        what += (f", resuming version {plan['version']} (an unfinished run of this command: "
                 "stopped or failed)")
    skipped = (f"; {len(plan['skipped'])} file(s) not named *.parquet are not read"
               if plan["skipped"] else "")
    return "\n".join([
        f"catalog:   {plan['catalog']}: {plan['rows']:,} rows in {plan['files']} file(s) "
        f"holding rows, {plan['shards']} shard(s){skipped}",
        f"embedding: {plan['dim']}-dim; item ids {plan['item_id_type']}",
        f"table:     {plan['table']} (latest: {plan['latest'] or 'no version yet'})",
        f"codebooks: {books}",
        f"would:     commit {what}, on engine {plan['engine']}",
        "dry run: the checks before the build's first write passed; nothing was written"])


def cmd_encode(args: argparse.Namespace) -> int:
    """`semid encode`: like build, but reuse the codebooks of encode.from_version instead of
    fitting (the config's or an override's; latest where neither names a version: encode
    never fits); --incremental: the catalog holds new or changed items and the version
    extends encode.from_version (encode.incremental=true; an override of it to false is
    refused)."""
    from pathlib import Path

    from semid_dist.config import apply_overrides
    from semid_dist.config_checks import read_yaml

    def encode_section(data: Any, overrides: list[str]) -> dict[str, Any] | None:
        """The encode section of `data` with `overrides`, as the config reads them (None
        where they cannot be read: the build's own reading names the error)."""
        with contextlib.suppress(ConfigError):
            merged = apply_overrides(data if isinstance(data, dict) else {}, overrides)
            section = merged.get("encode", {})
            return section if isinstance(section, dict) else None
        return None

    overrides = list(args.overrides)
    data = read_yaml(Path(args.config))  # (its errors name the file, as the build's would)
    section = encode_section(data, overrides)
    if section is not None and section.get("from_version") is None:  # ('' is refused)
        overrides.append("encode.from_version=latest")
    if args.incremental:
        said = (encode_section({}, args.overrides) or {}).get("incremental", True)
        if said is not True:
            raise ConfigError(f"--incremental and the override encode.incremental="
                              f"{json.dumps(said)} disagree; drop one")
        overrides.append("encode.incremental=true")
    args.overrides = overrides
    return cmd_build(args)


def cmd_validate(args: argparse.Namespace) -> int:
    """`semid validate FILE...`: every file is checked, as a build checks it before it starts
    (its keys and values, on local paths a table inside its own catalog, and a fit that
    takes more CPUs than the `ray.num_cpus` of an embedded Ray); one line per
    file, `ok` on stdout or the named error on stderr; status 2 when any was bad."""
    from semid_dist.config import load_config
    from semid_dist.io.store import TableStore
    from semid_dist.runtime import check_table_outside_catalog, is_local_path, with_absolute_paths

    status = 0
    files = args.config + args.files
    if not files:
        raise ConfigError("semid validate needs config files: semid validate FILE... (or "
                          "--config FILE, as semid build takes it)")
    for path in files:
        try:
            cfg = load_config(path)  # (its errors name the file)
            try:  # on this machine's paths: no file system client is made (s3fs or none)
                cfg = with_absolute_paths(cfg)
                if is_local_path(cfg.input.path) and is_local_path(cfg.output.root):
                    check_table_outside_catalog(cfg.input.path,
                                                TableStore(cfg.output.root, cfg.output.table))
                if cfg.engine == "ray" and cfg.ray.num_cpus and not cfg.ray.address:
                    from semid_dist.engines.ray_session import check_fit_cpus

                    check_fit_cpus(cfg, cfg.ray.num_cpus)  # (the embedded Ray's, as given)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        except SemidError as exc:
            print(f"semid validate: error: {exc}", file=sys.stderr, flush=True)
            status = 2
        else:
            _out(f"ok  {path}")
    return status


def _table(root: str, table: str) -> TableStore:
    """The table at --root / --table; StoreError where there is none (a mistyped --root or
    --table would list nothing, or be told to build a first version)."""
    from semid_dist.config_checks import check_table_name
    from semid_dist.io import fs as fsio
    from semid_dist.io.store import TableStore

    check_table_name(table, "--table")
    store = TableStore(root, table)
    if not store.fs.isdir(store.base):
        found = True
        with contextlib.suppress(OSError):  # (a store that refuses the question: no hint)
            found = store.fs.exists(posixpath.dirname(store.base.rstrip("/")))
        nothing = "" if found else (
            f" (nothing is found at --root {fsio.redact_url(root)} either: a bucket or folder "
            "that does not exist, or one this user may not list)")
        raise StoreError(f"no table at {fsio.redact_url(store.url)}{nothing}: check --root "
                         "and --table")
    # a table this user may not read: PermissionError here (the store's existence checks
    # said "no such file" for its files, and the table looked empty)
    store.fs.ls(store.base)
    return store


# `semid versions` options by action (dest: flag); the others are refused, not ignored
_VERSIONS_OPTIONS = {"list": {}, "show": {"version": "--version"},
                     "gc": {"keep": "--keep", "min_age_hours": "--min-age-hours",
                            "dry_run": "--dry-run"},
                     "diff": {"from_version": "--from", "to_version": "--to"}}


def _versions_options(args: argparse.Namespace) -> None:
    """Refuse an option of another `semid versions` action (`versions diff --version V`
    compared latest with its parent, status 0), then fill in the defaults."""
    own = _VERSIONS_OPTIONS[args.action]
    given = [flag for options in _VERSIONS_OPTIONS.values() for dest, flag in options.items()
             if dest not in own and getattr(args, dest) is not None]
    if given:
        takes = ", ".join(own.values()) or "no option but --json"
        raise ConfigError(f"{args.action} takes {takes}, not {', '.join(given)} (see "
                          "semid versions --help)")
    args.version = "latest" if args.version is None else args.version  # ('' is refused)
    args.to_version = "latest" if args.to_version is None else args.to_version
    args.min_age_hours = 24.0 if args.min_age_hours is None else args.min_age_hours
    args.dry_run = bool(args.dry_run)


def cmd_versions(args: argparse.Namespace) -> int:
    from semid_dist.runtime import absolute_url

    _versions_options(args)
    store = _table(absolute_url(args.root), args.table)  # (an absolute root: the paths shown)
    action = {"list": cmd_versions_list, "show": cmd_versions_show, "gc": cmd_versions_gc,
              "diff": cmd_versions_diff}[args.action]
    return action(args, store)


def cmd_versions_list(args: argparse.Namespace, store: TableStore) -> int:
    """`semid versions list`: every committed version, oldest first, `_latest`'s starred
    (listed also where `_latest` is damaged: the list is how to mend it)."""
    try:
        latest = store.head()
    except SemidError as exc:
        print(f"semid versions list: warning: {exc}", file=sys.stderr)
        latest = None
    rows = []
    for vid in store.versions():
        m = store.manifest(vid)
        rows.append({"version_id": vid, "latest": vid == latest, "parent": m.get("parent"),
                     "created_at": m.get("created_at"), "rows": m.get("rows")})
    text = "\n".join(f"{'*' if r['latest'] else ' '} {r['version_id']}  {r['created_at']}  "
                     f"encoded {r['rows']['encoded']}  rejected {r['rows']['rejected']}"
                     + (f"  carried {r['rows']['carried']}" if "carried" in r["rows"] else "")
                     + (f"  replaced {r['rows']['replaced']}" if "replaced" in r["rows"] else "")
                     for r in rows) or "(no committed versions)"
    _print(rows, args.json, text)
    return 0


def cmd_versions_show(args: argparse.Namespace, store: TableStore) -> int:
    """`semid versions show VERSION`: a version's manifest, metrics and drift (a file of
    it gone: the version is damaged, a named error)."""
    from semid_dist.diff import DRIFT_FILE
    from semid_dist.summary import METRICS_FORM_ERRORS, format_summary, other_form

    manifest = store.manifest(args.version)
    vid = manifest["version_id"]
    store.check_files(vid)
    metrics = store.read_json(vid, "metrics.json")
    drift = (store.read_json(vid, DRIFT_FILE)
             if any(f["path"] == DRIFT_FILE for f in manifest["files"]) else None)
    try:  # (--json prints what the files hold, whatever their form)
        text = "" if args.json else format_summary(vid, store.display_url(vid), metrics, drift)
    except METRICS_FORM_ERRORS as exc:
        try:  # which file: the summary without the drift reads the metrics alone
            format_summary(vid, "", metrics, None)
            file = DRIFT_FILE
        except METRICS_FORM_ERRORS:
            file = "metrics.json"
        raise other_form(vid, f"{type(exc).__name__}: {exc}", "--json prints it as it is",
                         file) from exc
    _print({"manifest": manifest, "metrics": metrics, "drift": drift}, args.json, text)
    return 0


def cmd_versions_gc(args: argparse.Namespace, store: TableStore) -> int:
    """`semid versions gc --keep N`: delete all but the N newest committed versions (and
    `_latest`, and what they reference), plus uncommitted leftovers older than
    --min-age-hours."""
    from semid_dist.io import fs as fsio
    from semid_dist.io.locks import lock_line
    from semid_dist.summary import format_gc

    if args.keep is None or args.keep < 0:
        given = "" if args.keep is None else f", not {args.keep}"
        raise ConfigError(f"needs --keep N{given} (N >= 0: how many of the "
                          "newest committed versions to keep; _latest's version is always "
                          "kept too)")
    if math.isnan(args.min_age_hours) or args.min_age_hours < 0:
        raise ConfigError(f"--min-age-hours {args.min_age_hours:g} must be >= 0 (how many hours "
                          "old an uncommitted version directory must be before gc removes it; "
                          "default 24)")
    report = store.gc(args.keep, min_age_hours=args.min_age_hours, dry_run=args.dry_run,
                      on_wait=lambda broken: print(
                          f"semid versions gc: {lock_line(fsio.redact_url(store.url), broken)}",
                          file=sys.stderr, flush=True))
    _print(report, args.json, format_gc(report))
    return 0


def cmd_versions_diff(args: argparse.Namespace, store: TableStore) -> int:
    """`semid versions diff --from V1 --to V2`: share of items whose SID changed (--to
    defaults to latest, --from to the parent of --to)."""
    from semid_dist.diff import version_drift
    from semid_dist.io.store import removed_while_read
    from semid_dist.summary import format_drift

    to = store.resolve(args.to_version)
    src = store.manifest(to).get("parent") if args.from_version is None else args.from_version
    if src is None:
        raise StoreError(f"version {to} has no parent; name the version to compare with: "
                         "--from VERSION")
    if args.from_version is None and not store.is_committed(src):
        raise StoreError(f"the parent of version {to}, {src} (the default --from), is no "
                         "longer in the table (removed by semid versions gc, or by hand); "
                         "name the version to compare with: --from VERSION")
    try:
        drift = version_drift(store, src, to)
    except FileNotFoundError:  # a part of a version `versions gc` removed meanwhile?
        committed = store.versions()
        gone = [v for v in (src, to) if v not in committed]
        if not gone:
            raise
        raise removed_while_read(gone[0]) from None
    _print(drift, args.json, format_drift(drift))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`semid report`: render the report of a committed version again, into its report/
    folder (restoring a missing or damaged file; a committed file is never rewritten with
    other bytes) or, with --out, into a folder of its own."""
    from semid_dist.io import fs as fsio
    from semid_dist.report import REPORT_HTML, rerender_report
    from semid_dist.runtime import absolute_url

    if args.overwrite and args.out is None:
        raise ConfigError("--overwrite goes with --out DIR (the version's own report files "
                          "are restored, never written over)")
    store = _table(absolute_url(args.root), args.table)  # (an absolute root: the URLs it prints)
    vid = store.resolve(args.version)
    store.manifest(vid)  # a damaged manifest: a named error, before anything is written
    out = None if args.out is None else absolute_url(args.out)
    if out is not None:
        fs, folder = fsio.resolve(out)
        if type(fs) is type(store.fs) and f"{folder}/".startswith(f"{store.base}/"):
            raise StoreError(f"--out {args.out} is inside the table {fsio.redact_url(store.url)}"
                             ", whose files only its builds write: give a folder outside it")
    written = rerender_report(store, vid, out, overwrite=args.overwrite)
    page = (f"{fsio.redact_url(out.rstrip('/'))}/report.html" if out is not None
            else f"{store.display_url(vid)}/{REPORT_HTML}")
    _print({"version_id": vid, "report": page, "written": written}, args.json, page)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`semid bench`: kernel / engine / fit / memory benchmark; prints one table and writes it
    as JSON and Markdown (a full run: docs/BENCHMARKS.md; `bench_options`)."""
    from semid_dist.bench.options import bench_options
    from semid_dist.bench.run import run_benchmark

    opts = bench_options(quick=args.quick, only=args.only, json_path=args.out_json,
                         md_path=args.out_md, workdir=args.workdir, blas_as_is=args.blas_as_is)
    results = run_benchmark(opts, echo=not args.json)
    if args.json:
        _print(results["table"], True, "")
    return 0


def _given(text: str) -> str:
    """A path option's value, refused when empty (`--root ''` was the file system's root to
    `versions`, the working directory to `report`)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


_OVERRIDES_HELP = ("settings over the config file's: a dotted key and a YAML value, e.g. "
                   "fit.sample_size=50000 quantizer.layers=[256,256,256]")


class _Once(argparse.Action):
    """An option that may be given once (a second `--config` replaced the first, silently:
    a build reads one file)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "given twice: a build reads one config file "
                                         "(give other settings as key=value overrides)")
        setattr(namespace, self.dest, values)


def parser() -> argparse.ArgumentParser:
    """The command line. Options are spelled out: argparse's prefixes (`--dry` for
    `--dry-run`) are refused, as a later option sharing the prefix would change their
    meaning."""
    from semid_dist import __version__

    p = argparse.ArgumentParser(prog="semid", description="Catalog-scale semantic IDs",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"semid {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, allow_abbrev=False)

    b = command("build", "fit -> encode -> reduce -> commit a new version")
    b.add_argument("--config", required=True, type=_given, action=_Once,
                   help="the YAML config file")
    b.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    b.add_argument("--dry-run", action="store_true",
                   help="make the checks a build makes before it writes anything, say what "
                        "it would do, and write nothing")
    b.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    b.set_defaults(func=cmd_build)
    e = command("encode", "encode with the codebooks of an existing version")
    e.add_argument("--config", required=True, type=_given, action=_Once,
                   help="the YAML config file")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.add_argument("--incremental", action="store_true",
                   help="the catalog holds new or changed items: carry the other items of "
                        "encode.from_version, referencing its unchanged data parts")
    e.add_argument("--dry-run", action="store_true",
                   help="make the checks the encode makes before it writes anything, say "
                        "what it would do, and write nothing")
    e.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    e.set_defaults(func=cmd_encode)
    v = command("validate", "check config files without running anything")
    v.add_argument("files", nargs="*", metavar="FILE")
    v.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a config file, as `semid build` takes it (may be given again)")
    v.set_defaults(func=cmd_validate)
    vs = command("versions", "list / show / gc / diff versions of a table")
    vs.add_argument("action", choices=["list", "show", "gc", "diff"])
    vs.add_argument("--root", required=True, type=_given)
    vs.add_argument("--table", required=True, type=_given)
    vs.add_argument("--version", help="show: the version (default: latest)")
    vs.add_argument("--keep", type=int, help="gc: how many newest committed versions to keep")
    vs.add_argument("--min-age-hours", type=float,
                    help="gc: remove uncommitted version directories older than this "
                         "(default: 24)")
    vs.add_argument("--dry-run", action="store_true", default=None,
                    help="gc: only print what would go")
    vs.add_argument("--from", dest="from_version", help="diff: old version (default: parent)")
    vs.add_argument("--to", dest="to_version", help="diff: new version (default: latest)")
    vs.add_argument("--json", action="store_true")
    vs.set_defaults(func=cmd_versions)
    r = command("report", "render the HTML report of a committed version again")
    r.add_argument("--root", required=True, type=_given)
    r.add_argument("--table", required=True, type=_given)
    r.add_argument("--version", default="latest")
    r.add_argument("--out", type=_given, help="a folder to write the report into (default: "
                   "the version's report/ folder, restoring missing or damaged files)")
    r.add_argument("--overwrite", action="store_true", help="with --out: write over report "
                   "files already there (refused by default where they hold other bytes)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
    bn = command("bench", "benchmark kernels, engines, fit and memory; a full run writes "
                 "docs/BENCHMARKS.md")
    bn.add_argument("--quick", action="store_true", help="small sizes (~3 min): check it works")
    bn.add_argument("--only", help="comma-separated sections: kernels,e2e,fit,rss,gpu")
    bn.add_argument("--out-json", type=_given, help="write the results as JSON here (a full "
                    "run given neither --out-json nor --out-md writes docs/benchmarks.json and "
                    "docs/BENCHMARKS.md; otherwise only what these options name)")
    bn.add_argument("--out-md", type=_given,
                    help="write the Markdown page here (see --out-json)")
    bn.add_argument("--workdir", type=_given, help="keep catalogs and versions here (default: "
                    "a temporary directory, removed afterwards)")
    bn.add_argument("--blas-as-is", action="store_true", help="load faiss's OpenBLAS with the "
                    "kernels it chooses, generic ones on a CPU it does not know (default: the "
                    "CPU's, so that faiss is measured at its best)")
    bn.add_argument("--json", action="store_true", help="also print the table as JSON")
    bn.set_defaults(func=cmd_bench)
    p.set_defaults(commands=tuple(sub.choices))
    return p


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Run the command line `argv` (default: the process's); returns its exit status. A
    caller's SIGINT handler is put back when it returns, unless the process is `exiting`
    with the status (`entry`)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:  # key=value overrides may follow options such as --json
        if not hasattr(args, "overrides") or any("=" not in e for e in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    commits = args.command in ("build", "encode")  # (a line "nothing was committed" fits)
    action = getattr(args, "action", None)  # (`semid versions gc: error: ...`)
    name = f"semid {args.command}" + (f" {action}" if action else "")
    return _run(name, lambda: args.func(args), exiting=exiting,
                committed=(lambda: getattr(args, "committed", None)) if commits else None,
                table=args.command not in ("bench", "validate"))


def _run(name: str, run: Callable[[], int], *, exiting: bool,
         committed: Callable[[], str | None] | None = None, table: bool = True) -> int:
    """`run()` with a command's endings: its status; a named failure one line `NAME: error:
    ...` and status 2 (an object store's "no credentials" too, and a storage failure a user
    mends: a full disk, a read-only mount, a permission denied); a closed stdout 141; Ctrl-C
    one line and 130 (SIGTERM 143), the Ctrl-Cs after the first ignored (`signals.one_interrupt`),
    and so an error no line names once the command's interrupt was raised (`_stopped`).
    The line says whether the version was committed where
    `committed` tells (one build's command); `table`: the command writes into a table (a
    full disk's line then names `semid versions gc`). The caller's SIGINT handler is put back
    unless the process is `exiting` with the status."""
    restore = one_interrupt()
    try:
        return run()
    except SemidError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except _StdoutClosed:  # what coreutils do: no message, the status of a SIGPIPE death
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no flush at exit)
        return 141  # 128 + SIGPIPE
    except OSError as exc:  # a full disk, a read-only mount, a permission denied
        from semid_dist.io.fs import storage_advice

        if (fix := storage_advice(exc, table=table)) is None:
            if (line := _object_store_line(exc, committed)) is None:
                if interrupt_raised():
                    return _stopped(name, exc, committed)
                raise
            print(f"{name}: error: {line}", file=sys.stderr)
            return 2
        print(f"{name}: error: {one_line(exc)}: {fix}", file=sys.stderr)
        return 2
    except Exception as exc:  # (Ray's wrapper of a task's error subclasses it)
        if (line := _object_store_line(exc, committed)) is None:
            if interrupt_raised():  # (a Ctrl-C's abort of the fit's actors: the Ctrl-C)
                return _stopped(name, exc, committed)
            if (line := _ray_lost_line(exc, committed)) is None:
                raise
        print(f"{name}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # (InterruptedAfterCommit: once the manifest is written)
        return _stopped(name, exc, committed)
    finally:
        if not exiting:
            restore()
        else:
            exiting_signals()


def _stopped(name: str, exc: BaseException,
             committed: Callable[[], str | None] | None) -> int:
    """A command stopped by its Ctrl-C or SIGTERM: one line, whether the version was
    committed where `committed` tells, status 130 (SIGTERM 143). `exc`: the
    KeyboardInterrupt, or an error no line names that came after the command's interrupt was
    raised (`signals.interrupt_raised`: Python drops one raised inside a finaliser, and what
    the stopping then broke failed with a traceback, status 1)."""
    version = getattr(exc, "version_id", None) or (committed and committed())
    stop = "terminated (SIGTERM)" if terminated() else "interrupted"
    resumes = getattr(exc, "resumes", None)  # (InterruptedBuild: the version it had started)
    again = f" (the same command resumes version {resumes})" if resumes else ""
    said = (f"{stop} after version {version} was committed" if version else
            f"{stop}; nothing was committed{again}" if committed else stop)
    print(f"{name}: {said}", file=sys.stderr)
    return 143 if terminated() else 130


def _object_store_line(exc: BaseException,
                       committed: Callable[[], str | None] | None) -> str | None:
    """The one line for what a storage's client raised that a user mends, or None: no
    credentials found, a server that does not answer (refused, timed out, gone), an option
    fsspec's configuration gives that the client does not take, parameters the client
    refuses (a bucket name S3 does not allow). Where the command commits
    (`committed`), the line says whether it did."""
    from semid_dist.io.fs import (
        NO_ANSWER,
        NO_CREDENTIALS,
        credentials_advice,
        named,
        no_answer,
        no_answer_advice,
        redact_url,
        refused_option,
        remote_failure,
    )

    def said(names: tuple[str, ...]) -> str:  # (the innermost: not a Ray task's wrapper)
        shown = [e for e in wrapped_errors(exc) if named(e, names)][-1]
        return f"{type(shown).__name__}: {redact_url(one_line(shown))}"

    errors = list(wrapped_errors(exc))
    if any(named(e, NO_CREDENTIALS) for e in errors):
        line = (f"no credentials for the object store ({said(NO_CREDENTIALS)}); "
                f"{credentials_advice(remote_failure(exc))}")
    elif no_answer(exc):
        line = (f"the storage does not answer ({said(NO_ANSWER)}); {no_answer_advice()}, then "
                "run the command again")
    elif (refused := refused_option(exc)) is not None:
        protocols, option = refused
        client = ('; botocore\'s settings go under "config_kwargs", as in '
                  '{"config_kwargs": {"retries": {"max_attempts": 1}}}' if "s3" in protocols
                  else "")
        names = " / ".join(f"FSSPEC_{p.upper()} (or FSSPEC_{p.upper()}_{option.upper()})"
                           for p in protocols)
        line = (f"the {' or '.join(f'{p}://' for p in protocols)} file system does not take "
                f"the option {option!r} that fsspec's configuration gives it "
                f"({said(('TypeError',))}); remove it from {names}, or the files in "
                f"FSSPEC_CONFIG_DIR{client}")
    elif any(named(e, ("ParamValidationError",)) for e in errors):  # botocore's
        line = (f"the object store's client refuses the request "
                f"({said(('ParamValidationError',))}); check the URL (S3 bucket names: "
                "lowercase letters, digits, '.' and '-')")
    else:
        return None
    return _said_commit(line, committed)


def _said_commit(line: str, committed: Callable[[], str | None] | None) -> str:
    """`line`, and where the command commits (`committed`) whether it did."""
    if committed is None:
        return line
    version = committed()
    return line + (f" (version {version} was committed)" if version
                   else "; nothing was committed")


# Ray's errors for processes it lost: an actor's or task's worker, a node, the cluster's
# head (its GCS) or this machine's raylet (Ray Train's controller unreachable, say), an
# object's owner; and its memory monitor's killing a worker. Matched by exact name among
# Ray's own classes: a task's error comes wrapped in `RayTaskError(<its class>)`, which
# subclasses that class (a CUDA OutOfMemoryError of torch is no memory monitor's).
RAY_LOST = ("ActorUnavailableError", "ActorDiedError", "NodeDiedError", "LocalRayletDiedError",
            "ObjectLostError", "OwnerDiedError", "WorkerCrashedError")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _ray_lost_line(exc: BaseException,
                   committed: Callable[[], str | None] | None) -> str | None:
    """The one line for a build whose Ray lost processes it ran on (`RAY_LOST`, or Ray's
    memory monitor killing a task's worker), with Ray's own first line; else None, as for
    an actor whose constructor raised (ActorDiedError's `actor_init_failed`: its traceback
    names the cause). (A ~60-line traceback ending in ActorUnavailableError was what a
    cluster stopped during the fit gave.)"""
    lost = [e for e in wrapped_errors(exc) if type(e).__module__ == "ray.exceptions"
            and type(e).__name__ in (*RAY_LOST, "OutOfMemoryError")]
    if not lost or getattr(lost[-1], "actor_init_failed", False):
        return None
    shown = lost[-1]
    text = _ANSI.sub("", str(shown)).strip()
    first = " ".join((text.splitlines() or [""])[0].split())[:300]
    ray_said = f"{type(shown).__name__}: {first}" if first else type(shown).__name__
    again = "then run the same command (it goes on from the shards this run finished)"
    if type(shown).__name__ == "OutOfMemoryError":
        line = (f"Ray's memory monitor stopped a worker of the build ({ray_said}): the node's "
                "memory ran short; lower encode.num_actors or encode.shard_rows (or "
                f"fit.num_workers), or give the nodes more memory, {again}")
    else:
        line = (f"Ray lost processes the build ran on ({ray_said}): the cluster or one of its "
                "nodes stopped, or a worker process died; where the cluster stopped, start it "
                f"again (`ray status` shows it), {again}")
    return _said_commit(line, committed)


def job_entry(name: str, run: Callable[[list[str]], int]) -> None:
    """A job script's entry (jobs/*.py): `run(sys.argv[1:])`, then exit with its status,
    ending as `semid`'s commands do (`_run`, `_exit`)."""
    _exit(lambda: _run(name, lambda: run(sys.argv[1:]), exiting=True))


def _exit(run: Callable[[], int]) -> None:
    """Exit the process with `run()`'s status; from its return on, Ctrl-C is ignored (the
    process is exiting: one in its exit killed it by SIGINT, its work done, status -2)."""
    status = 130
    try:
        status = run()
    except KeyboardInterrupt:  # (one in the instant between the command's end and here)
        status = 143 if terminated() else 130
    finally:
        exiting_signals()
    sys.exit(status)


def command_names() -> list[str]:
    """The `semid` commands, as its parser has them (`jobs/spark_build.py` runs two)."""
    return list(parser().get_default("commands"))


def entry(argv: list[str] | None = None) -> None:
    """The `semid` command (`argv`, default the process's): `main`, then exit with its
    status. The Ctrl-Cs after the first,
    and any once the command is done, are ignored until the process exits (one after
    `main` put Python's handler back killed it by SIGINT, not status 130 or 0)."""
    _exit(lambda: main(argv, exiting=True))


if __name__ == "__main__":
    entry()
