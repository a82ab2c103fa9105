"""Time the plan's reading of a catalog's footers on an object store: one file at a time
against `FOOTER_THREADS` at once, on the same catalog in one run.

The catalog is `--files` small Parquet files in a bucket of moto's S3 server, started on
127.0.0.1 for the run (the `dev` extra installs it), reached through a proxy that holds each
request `--latency-ms` before passing it on, as a cloud object store's round trip takes tens
of milliseconds (0: moto as it is, one process bound by Python's GIL). s3fs's client keeps
10 connections (botocore's default): 10 requests in flight at most, of the 16 footers.

    python jobs/plan_bench.py                   # 1,000 files, 20 ms (~1 min)
    python jobs/plan_bench.py --files 3000 --latency-ms 0
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.bench.moto import free_port, start_moto, start_proxy
from semid_dist.io import catalog


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--threads", type=int, default=catalog.FOOTER_THREADS)
    p.add_argument("--latency-ms", type=float, default=20.0)
    args = p.parse_args()
    if args.threads < 2 or args.files < 1:
        p.error("--threads must be at least 2 (it is measured against one) and --files at "
                "least 1")
    try:
        import s3fs
    except ImportError:
        raise SystemExit("plan_bench: needs s3fs and moto[server] (pip install -e '.[dev]')"
                         ) from None
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = start_moto(port, os.path.join(tmp, "moto.log"))
        except RuntimeError as exc:
            raise SystemExit(f"plan_bench: {exc}") from None
        try:
            proxy = start_proxy(port, args.latency_ms / 1000)
            for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                        "AWS_ENDPOINT_URL_S3"):  # (the bench's store only, whatever is set)
                os.environ.pop(var, None)
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy}",
                              AWS_DEFAULT_REGION="us-east-1")
            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            rng = np.random.default_rng(0)
            for i in range(args.files):
                rows = 50
                emb = pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.standard_normal(rows * 8).astype(np.float32)), 8)
                buf = io.BytesIO()
                pq.write_table(pa.table({"item_id": np.arange(i * rows, (i + 1) * rows),
                                         "embedding": emb}), buf)
                fs.pipe_file(f"bench/cat/part-{i:05d}.parquet", buf.getvalue())
            url = "s3://bench/cat"
            seconds = {}
            for threads in (1, args.threads, 1, args.threads):  # twice each, in turns
                catalog.FOOTER_THREADS = threads
                start = time.perf_counter()
                plan = catalog.plan_catalog(url)
                spent = time.perf_counter() - start
                seconds[threads] = min(seconds.get(threads, spent), spent)
            one, many = seconds[1], seconds[args.threads]
            print(f"{args.files} files ({plan.num_rows} rows, {len(plan.shards)} shard(s)) on "
                  f"moto's S3 at 127.0.0.1, {args.latency_ms:g} ms a request: plan "
                  f"{one:.3f} s reading one footer at a time, "
                  f"{many:.3f} s reading {args.threads} at once ({one / many:.2f}x; the "
                  "best of two runs each)")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
