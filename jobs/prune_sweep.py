"""Compare pruning strategies on one catalog: fit once, re-encode with each strategy.

    python jobs/prune_sweep.py --config conf/demo.yaml [--root DIR] [key=value ...]

Prints a Markdown table of layer-2 (index 1) Gini after pruning, unique-SID rate, distinct
SIDs, max items per SID and mean SID length. The builds' versions land under --root (default:
a temporary directory, removed afterwards), never in the config's own table: a sweep is an
experiment, and its last version would become that table's `_latest`. Each of the (up to)
ten versions holds a whole SID table (the demo's: ~1 MB each). An engine on a cluster (Ray with
ray.address, Spark with a master that is not local) needs a --root every worker can reach.
"""

import argparse
import tempfile

from semid_dist.cli import job_entry
from semid_dist.config import BuildConfig, load_config
from semid_dist.engines.spark_session import session_master
from semid_dist.errors import ConfigError
from semid_dist.pipeline import build

TOP_K = (4, 16, 64)


def strategies(cfg: BuildConfig) -> list[tuple[str, list[str]]]:
    """The sweep's rows: a name and its overrides. top_k's K values are those of TOP_K below
    the pruned layer's size (a K of the whole layer prunes every token), else half of it."""
    size = cfg.quantizer.layers[cfg.prune.layer]
    ks = [k for k in TOP_K if k < size] or [max(1, size // 2)]
    return [
        ("none", ["prune.strategy=none"]), ("drop_layer", ["prune.strategy=drop_layer"]),
        *[(f"top_k K={k}", ["prune.strategy=top_k", f"prune.k={k}"]) for k in ks],
        *[(f"mass p={p}", ["prune.strategy=mass", f"prune.p={p}"]) for p in (0.1, 0.3)],
        *[(f"sarq tau={t}", ["prune.strategy=sarq", f"prune.tau={t}"])
          for t in (0.001, 0.0002)],
    ]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--root", help="output root of the builds (default: a temporary "
                   "directory, removed afterwards)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    _check_root(cfg, args.root, args.overrides)
    quiet = lambda msg: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="semid-prune-sweep-") as tmp:
        overrides = [*args.overrides, f"output.root={args.root or tmp}"]
        base = build(load_config(args.config, overrides), log=quiet)
        print("| strategy | layer-2 Gini | layer-2 used | unique-SID rate | distinct SIDs | "
              "max items/SID | mean SID length |")
        print("|---|---|---|---|---|---|---|")
        for name, extra in strategies(cfg):
            over = [*overrides, f"encode.from_version={base.version_id}", *extra]
            m = build(load_config(args.config, over), log=quiet).metrics
            l2, col = m["pruning"]["layers_after"][1], m["collisions"]
            print(f"| {name} | {l2['gini']:.4f} | {l2['used']} | "
                  f"{col['unique_sid_rate']:.4f} | {col['distinct_sids']} | "
                  f"{col['max_items_per_sid']} | {m['pruning']['mean_sid_length']:.3f} |",
                  flush=True)
    return 0


def _check_root(cfg: BuildConfig, root: str | None, overrides: list[str]) -> None:
    """The sweep's output root is --root's: a temporary directory on this machine is no place
    for a cluster's workers to write, and an output.root override would be replaced."""
    master = session_master(cfg)  # None: spark-submit's, which may be a cluster's
    cluster = ((cfg.engine == "ray" and cfg.ray.address) or
               (cfg.engine == "spark" and not (master or "").startswith("local")))
    if cluster and root is None:
        raise ConfigError(f"engine {cfg.engine} runs on a cluster here: give "
                          "--root on storage every worker can reach (s3://..., hdfs://...), "
                          "not the default temporary directory on this machine")
    if any(o.split("=", 1)[0].strip() == "output.root" for o in overrides):
        raise ConfigError("give the sweep's output root as --root DIR, not "
                          "output.root= (the config's own table is left alone)")


if __name__ == "__main__":
    job_entry("prune_sweep.py", main)
