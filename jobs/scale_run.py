"""A large build end to end on this machine, measured: time per stage, peak memory of the
whole process tree (driver, Ray's own processes and workers), throughput; then a projection
for a larger catalog on a cluster, with every assumption stated. Writes docs/SCALE.md.

    python jobs/scale_run.py                       # 20M x 128, conf/scale.yaml (local Ray)
    python jobs/scale_run.py --rows 2000000        # a smaller check

The catalog is generated first (scripts/gen_synthetic.py's model, bounded memory) unless it
is already there with the asked row count and dimension. Relative paths are of the current
directory.
"""

import sys

from semid_dist.bench.scale import parser, run_scale

if __name__ == "__main__":
    sys.exit(run_scale(parser().parse_args()))
