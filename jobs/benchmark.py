"""Benchmark the encode kernel, the engines, the fit and peak memory on this machine.

Prints one table; a full run writes it as docs/benchmarks.json and docs/BENCHMARKS.md, a
quick or partial run only where --out-json / --out-md say (the same as `semid bench`). Run
it alone on an idle machine: it uses every core.

Full run (11-25 min on 2 cores): python jobs/benchmark.py
Check that it works (~3 min):    python jobs/benchmark.py --quick
Some sections only:              python jobs/benchmark.py --only kernels,fit --out-md /tmp/b.md
Elsewhere, not over the docs:    python jobs/benchmark.py --out-json /tmp/b.json --out-md /tmp/b.md

It starts its own embedded Ray and local Spark in subprocesses (one per job), so run it on one
machine, not through `ray job submit`.
"""

import sys

from semid_dist.cli import entry

if __name__ == "__main__":
    entry(["bench", *sys.argv[1:]])
