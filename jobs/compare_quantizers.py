"""Compare rq_kmeans, rq_vae, r3vae and acrq (both bases) at equal layer sizes (Markdown).

Each method runs a full build (fit -> encode -> reduce -> commit; on the local engine unless an
`engine=` override says otherwise) into --root (default: a temporary directory, removed
afterwards; overrides of output.root, output.table, quantizer.method and acrq_base, which
each row sets, are refused) and
its row of the table, read from the committed metrics, is printed as it finishes:
    python jobs/compare_quantizers.py --config conf/demo.yaml [key=value ...]
    python jobs/compare_quantizers.py --config conf/demo.yaml quantizer.epochs=40
"""

from __future__ import annotations

import argparse
import tempfile

from semid_dist.cli import job_entry
from semid_dist.config import load_config
from semid_dist.pipeline import build, make_logger
from semid_dist.runtime import check_experiment_root, refuse_overrides

# (row label, overrides): acrq on residual k-means and on rq_vae
METHODS = (("rq_kmeans", ["quantizer.method=rq_kmeans"]), ("rq_vae", ["quantizer.method=rq_vae"]),
           ("r3vae", ["quantizer.method=r3vae"]), ("acrq", ["quantizer.method=acrq"]),
           ("acrq_rq_vae", ["quantizer.method=acrq", "quantizer.acrq_base=rq_vae"]))


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def row(method: str, m: dict) -> str:
    """One Markdown table row of a build's metrics.json."""
    util = "/".join(f"{layer['utilization']:.2f}" for layer in m["layers"])
    gini = "/".join(f"{layer['gini']:.2f}" for layer in m["layers"])
    q = m.get("quality") or {}
    head, tail = ((m.get(part) or {}).get("reconstruction", {}).get("mse")
                  for part in ("head", "tail"))
    return (f"| {method} | {m['reconstruction']['mse']:.4f} | "
            f"{m['reconstruction']['relative_error']:.3f} | {_num(head)} | {_num(tail)} | "
            f"{util} | "
            f"{m['collisions']['unique_sid_rate']:.3f} | {gini} | "
            f"{_num(q.get('semantic_cohesion'))} | {_num(q.get('preference_discrimination'))} |")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--config", required=True)
    ap.add_argument("--root", help="output root of the builds (default: a temporary "
                    "directory, removed afterwards)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for every build (dotted keys, YAML values)")
    args = ap.parse_args(argv)
    log = make_logger("compare")
    overrides = ["engine=local", *args.overrides]
    refuse_overrides(args.overrides, "comparison", ("output.root", "output.table",
                                                    "quantizer.method", "quantizer.acrq_base"))
    check_experiment_root(load_config(args.config, [*overrides, f"output.table={METHODS[0][0]}"]),
                          args.root)
    with tempfile.TemporaryDirectory(prefix="semid-compare-") as tmp:
        root = args.root or tmp
        configs = [(label, load_config(args.config, [*overrides, f"output.root={root}",
                                                     f"output.table={label}", *method]))
                   for label, method in METHODS]  # every method's settings, before a build
        print("| method | MSE | relative error | head MSE | tail MSE | utilization per layer "
              "| unique-SID rate | Gini per layer | SC | PD |\n"
              "|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for label, cfg in configs:
            log(f"{label}: layers {list(cfg.quantizer.layers)}")
            print(row(label, build(cfg, log=log).metrics), flush=True)
    return 0


if __name__ == "__main__":
    job_entry("compare_quantizers.py", main)
