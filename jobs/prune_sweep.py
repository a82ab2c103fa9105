"""Compare pruning strategies on one catalog: fit once, re-encode with each strategy.

    python jobs/prune_sweep.py --config conf/demo.yaml [--root DIR] [key=value ...]

Prints a Markdown table of layer-2 (index 1) Gini after pruning, unique-SID rate, distinct
SIDs, max items per SID and mean SID length. The builds' versions land under --root (default:
a temporary directory, removed afterwards), never in the config's own table: a sweep is an
experiment, and its last version would become that table's `_latest`. Each of the (up to)
ten versions holds a whole SID table (the demo's: ~1 MB each). An engine on a cluster (Ray with
ray.address, Spark with a master that is not local) needs a --root every worker can reach;
overrides of the keys its rows set (output.root, encode.from_version, prune.strategy, k, p,
tau) are refused. Every row's settings are checked before the first build;
progress goes to stderr.
"""

import argparse
import sys
import tempfile
import time

from semid_dist.cli import job_entry
from semid_dist.config import BuildConfig, load_config
from semid_dist.pipeline import build
from semid_dist.runtime import check_experiment_root, refuse_overrides

TOP_K = (4, 16, 64)


def strategies(cfg: BuildConfig) -> list[tuple[str, list[str]]]:
    """The sweep's rows: a name and its overrides. top_k's K values are those of TOP_K below
    the pruned layer's size (a K of the whole layer prunes every token), else half of it."""
    layers, layer = cfg.quantizer.layers, cfg.prune.layer
    size = layers[layer] if layer < len(layers) else 0  # (each row's config then says why)
    ks = [k for k in TOP_K if k < size] or [max(1, size // 2)]
    return [
        ("none", ["prune.strategy=none"]), ("drop_layer", ["prune.strategy=drop_layer"]),
        *[(f"top_k K={k}", ["prune.strategy=top_k", f"prune.k={k}"]) for k in ks],
        *[(f"mass p={p}", ["prune.strategy=mass", f"prune.p={p}"]) for p in (0.1, 0.3)],
        *[(f"sarq tau={t}", ["prune.strategy=sarq", f"prune.tau={t}"])
          for t in (0.001, 0.0002)],
    ]


def _quiet(msg: str) -> None:  # the builds' own progress
    pass


def _progress(msg: str) -> None:
    print(f"sweep: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", required=True)
    p.add_argument("--root", help="output root of the builds (default: a temporary "
                   "directory, removed afterwards)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every build (dotted keys, YAML values)")
    args = p.parse_args(argv)
    refuse_overrides(args.overrides, "sweep", ("output.root", "encode.from_version",
                                               "prune.strategy", "prune.k", "prune.p",
                                               "prune.tau"))
    cfg = load_config(args.config, args.overrides)
    check_experiment_root(cfg, args.root)
    rows = strategies(cfg)
    for _, extra in rows:  # each row's settings, before the first build
        load_config(args.config, [*args.overrides, "encode.from_version=latest", *extra])
    with tempfile.TemporaryDirectory(prefix="semid-prune-sweep-") as tmp:
        overrides = [*args.overrides, f"output.root={args.root or tmp}"]
        t0 = time.monotonic()
        _progress(f"building the base version (fit once) under {args.root or tmp}")
        base = build(load_config(args.config, overrides), log=_quiet)
        _progress(f"base version {base.version_id} in {time.monotonic() - t0:.0f} s; "
                  f"encoding it with each of {len(rows)} strategies")
        print("| strategy | layer-2 Gini | layer-2 used | unique-SID rate | distinct SIDs | "
              "max items/SID | mean SID length |")
        print("|---|---|---|---|---|---|---|")
        for name, extra in rows:
            over = [*overrides, f"encode.from_version={base.version_id}", *extra]
            m = build(load_config(args.config, over), log=_quiet).metrics
            l2, col = m["pruning"]["layers_after"][1], m["collisions"]
            gini = f"{l2['gini']:.4f}" if l2["used"] else "-"  # (drop_layer: no item keeps it)
            print(f"| {name} | {gini} | {l2['used']} | "
                  f"{col['unique_sid_rate']:.4f} | {col['distinct_sids']} | "
                  f"{col['max_items_per_sid']} | {m['pruning']['mean_sid_length']:.3f} |",
                  flush=True)
        _progress(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    job_entry("prune_sweep.py", main)
