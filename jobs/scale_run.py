"""A large build end to end on this machine, measured: time per stage, peak memory of the
whole process tree (driver, Ray's own processes and workers), throughput; then a projection
for a larger catalog on a cluster, with every assumption stated. Writes docs/SCALE.md
(another --rows, --dim or --config: SCALE.md in --workdir, unless --out-md says where).

    python jobs/scale_run.py                       # 20M x 128, conf/scale.yaml (local Ray)
    python jobs/scale_run.py --rows 2000000        # a smaller check (out/scale/SCALE.md)

The catalog is generated first (scripts/gen_synthetic.py's model, bounded memory) unless it
is already there with the asked row count and dimension. Relative paths are of the current
directory.
"""

from semid_dist.bench.scale import parser, run_scale
from semid_dist.cli import job_entry

if __name__ == "__main__":
    job_entry("scale_run.py", lambda argv: run_scale(parser().parse_args(argv)))
