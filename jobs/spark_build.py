"""Build a SID table version on Spark: sample (tasks) -> fit (driver) -> encode (mapInArrow)
-> reduce -> commit. `engine=spark` is added unless an override names an engine; a first
argument `encode` re-encodes with the codebooks of `encode.from_version` (default latest).

Laptop (venv active, so driver and Python workers run its python; spark-submit starts the
driver JVM, so it takes the JVM options `spark.java_options` gives a session the job starts;
spark.log.level=WARN keeps Spark's INFO lines, ~400 of them, out of the job's output):
    spark-submit --master local[2] --driver-java-options -XX:TieredStopAtLevel=1 \\
        --conf spark.log.level=WARN jobs/spark_build.py --config conf/spark.yaml
spark-submit runs the job with its stderr joined to its stdout (the progress lines, the
summary and an error's one line all come on stdout).
Without spark-submit (starts local[*] from the config's `spark:` section):
    python jobs/spark_build.py --config conf/spark.yaml output.root=/tmp/spark_demo
Re-encode a new catalog snapshot with the latest version's codebooks:
    spark-submit --master local[2] jobs/spark_build.py encode --config conf/spark.yaml

On a YARN cluster, input.path and output.root must be on shared storage (s3://, hdfs://) and
semid_dist with its dependencies (numpy, pyarrow, torch, fsspec) must be importable on every
executor: ship a packed venv, or a wheel when the dependencies are already there:
    venv-pack -o semid-env.tar.gz
    spark-submit --master yarn --deploy-mode client \\
        --archives semid-env.tar.gz#env --conf spark.pyspark.python=./env/bin/python \\
        --conf spark.pyspark.driver.python=.venv/bin/python \\
        --driver-memory 8g --conf spark.executor.memory=8g --conf spark.executor.cores=4 \\
        --conf spark.executor.instances=16 --conf spark.driver.maxResultSize=4g \\
        jobs/spark_build.py --config conf/spark.yaml \\
        input.path=hdfs:///data/catalog/ output.root=hdfs:///semid
    # or, where the dependencies are installed on every node (a shared venv), ship only the
    # package: pip wheel --no-deps -w dist . && spark-submit ... --py-files dist/semid_dist-*.whl
The driver fits the codebooks on the sample (fit.sample_size rows x dim x 4 bytes must fit in
--driver-memory); each encode task holds one shard (encode.shard_rows) and the codebooks, and
every shard's statistics are staged on the output storage and merged by the driver (only
their counts are collected through Spark).
"""

import sys

from semid_dist.cli import command_names, entry

JOB_COMMANDS = ("build", "encode")  # the semid commands this job runs


def spark_argv(argv: list[str]) -> list[str]:
    """`[build|encode] --config F [k=v ...]` -> the `semid` argv, with engine=spark added next
    to the other overrides (argparse takes them as one group) unless one names the engine."""
    if argv[:1] and argv[0] not in JOB_COMMANDS and argv[0] in command_names():
        # (`versions list` was `build`'s "--config is required")
        raise ValueError(f"runs build or encode, not {argv[0]}; run `semid {argv[0]} ...` "
                         "for that")
    command = argv[0] if argv[:1] and argv[0] in JOB_COMMANDS else "build"
    rest = argv[1:] if argv[:1] == [command] else list(argv)
    if not any(a.startswith("engine=") for a in rest):
        overrides = [i for i, a in enumerate(rest)
                     if "=" in a and not a.startswith("-") and rest[i - 1:i] != ["--config"]]
        rest.insert(overrides[0] if overrides else len(rest), "engine=spark")
    return [command, *rest]


if __name__ == "__main__":
    try:
        argv = spark_argv(sys.argv[1:])
    except ValueError as exc:
        print(f"spark_build.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    entry(argv)
