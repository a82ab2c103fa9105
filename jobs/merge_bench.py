"""Time the encode stage's merge of shard statistics: `StreamMerge` (the running total, the
SID count tables in runs) against merging each shard into one total (`merge_all`'s fold), on
the same partials in one run.

Shards of 65,536 items with uniform 3 x 256 codes (every item's SID all but distinct: the SID
tables grow with the items, as a large catalog's do), `--dim`-dimensional embeddings.

    python jobs/merge_bench.py                  # 120 shards, d = 32 (~1 min, ~2 GiB)
    python jobs/merge_bench.py --shards 40 --dim 128
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from semid_dist.codes.partials import StreamMerge, merge, partial_from_batch

ROWS, SIZES = 65_536, (256, 256, 256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--shards", type=int, default=120)
    p.add_argument("--dim", type=int, default=32)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    stream, total = StreamMerge(), None
    spent = {"runs": 0.0, "fold": 0.0}
    for i in range(args.shards):
        codes = rng.integers(0, 256, size=(ROWS, len(SIZES))).astype(np.int32)
        x = rng.standard_normal((ROWS, args.dim)).astype(np.float32)
        sq = rng.random((ROWS, len(SIZES))).astype(np.float32)
        part = partial_from_batch(codes, sq, x, SIZES, quality_depth=2)
        t = time.perf_counter()
        stream.push(part)
        spent["runs"] += time.perf_counter() - t
        t = time.perf_counter()
        total = part if total is None else merge(total, part)
        spent["fold"] += time.perf_counter() - t
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{args.shards} shards: runs {spent['runs']:.2f} s, fold "
                  f"{spent['fold']:.2f} s", flush=True)
    t = time.perf_counter()
    result = stream.result()
    spent["runs"] += time.perf_counter() - t
    same = result.to_bytes() == total.to_bytes()
    print(f"{args.shards} shards of {ROWS} items, d = {args.dim}: {len(result.sid_keys)} SIDs; "
          f"merge time: StreamMerge {spent['runs']:.2f} s, one total {spent['fold']:.2f} s "
          f"({spent['fold'] / spent['runs']:.2f}x); results identical: {same}")


if __name__ == "__main__":
    main()
