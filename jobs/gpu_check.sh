#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU and the project's dependencies: the
# gpu-marked tests, then `semid bench --only gpu`. Logs, JSON and Markdown go to OUTDIR.
#   jobs/gpu_check.sh OUTDIR        (PYTHON=... to pick the interpreter, e.g. .venv/bin/python)
# Runs from the repository root wherever it is called from; the repository is on PYTHONPATH,
# so the project need not be installed.
set -uo pipefail
mkdir -p "${1:?usage: jobs/gpu_check.sh OUTDIR}" || exit 1
out=$(cd "$1" && pwd)
py=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" - <<'EOF' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    why = ("it is a CPU build" if torch.version.cuda is None else
           f"built for CUDA {torch.version.cuda}, it finds no CUDA device")
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU ({why}); run it on a "
             "machine with one, with a CUDA build of torch")
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
if command -v nvidia-smi > /dev/null; then nvidia-smi -L; fi
"$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_learned.py \
    2>&1 | tee "$out/gpu_tests.log"
tests=$?
"$py" -m semid_dist.cli bench --only gpu --out-md "$out/BENCHMARKS-gpu.md" \
    --out-json "$out/benchmarks-gpu.json" 2>&1 | tee "$out/bench.log"
bench=$?
echo "gpu tests: exit $tests; bench: exit $bench"
exit $((tests || bench))
