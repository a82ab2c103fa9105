"""Build a new SID table version: fit -> encode -> reduce -> commit.

Locally (embedded Ray):   python jobs/build.py --config conf/demo.yaml
On a Ray cluster:         ray job submit --address http://HEAD:8265 --working-dir . -- \
                              python jobs/build.py --config conf/cluster.yaml
Overrides:                python jobs/build.py --config conf/demo.yaml fit.sample_size=5000
"""

import sys

from semid_dist.cli import entry

if __name__ == "__main__":
    entry(["build", *sys.argv[1:]])
