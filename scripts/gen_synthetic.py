"""Write a seeded synthetic item catalog as Parquet (see semid_dist/bench/synthetic.py).

Clustered embeddings (two-level Gaussian mixture, Zipf cluster sizes), Zipf-like popularity,
embedding norm growing with popularity; one row group per chunk, bounded memory.

    python scripts/gen_synthetic.py --out data/synthetic-1m --rows 1000000 --dim 128
    python scripts/gen_synthetic.py --out s3://bucket/catalogs/syn --rows 50000000 --dim 768 \\
        --chunk-rows 65536 --chunks-per-file 16

Then e.g. `semid build --config conf/demo.yaml engine=local input.path=data/synthetic-1m`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from semid_dist.bench.synthetic import (
    COMPRESSIONS,
    CatalogSpec,
    at_least,
    default_chunk_rows,
    write_catalog,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="directory (local path or fsspec URL); the "
                   "part-*.parquet files of an earlier catalog there are replaced")
    p.add_argument("--rows", type=at_least(1), required=True)
    p.add_argument("--dim", type=at_least(1), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=at_least(1), default=CatalogSpec.clusters)
    p.add_argument("--groups", type=at_least(1), default=CatalogSpec.groups)
    p.add_argument("--chunk-rows", type=at_least(1), help="rows per row group (default: <= 256 "
                   "MiB); each is drawn on its own, so the same seed and chunk rows give the "
                   "same catalog")
    p.add_argument("--chunks-per-file", type=at_least(1), default=4)
    p.add_argument("--compression", default="snappy", choices=COMPRESSIONS)
    a = p.parse_args()
    if os.path.isfile(a.out):
        p.error(f"--out {a.out}: is a file; give a folder (new, or of an earlier catalog)")
    spec = CatalogSpec(dim=a.dim, clusters=a.clusters, groups=a.groups, seed=a.seed)
    t = time.perf_counter()
    try:
        info = write_catalog(a.out, spec, a.rows,
                             chunk_rows=a.chunk_rows or default_chunk_rows(a.dim),
                             chunks_per_file=a.chunks_per_file, compression=a.compression)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:  # (a file on the way)
        p.error(f"--out {a.out}: cannot be written ({exc})")
    print(json.dumps({**dataclasses.asdict(info), "seconds": round(time.perf_counter() - t, 2),
                      "spec": dataclasses.asdict(spec)}, indent=2))


if __name__ == "__main__":
    main()
