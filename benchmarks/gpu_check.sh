#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): engine throughput and 7B-pipeline peak memory.
#   bash benchmarks/gpu_check.sh            # full run, GPU machine, about 3-4 minutes on an H100
#   bash benchmarks/gpu_check.sh --smoke    # tiny configs, CPU is fine
#   bash benchmarks/gpu_check.sh --diagnose # only: why the engine is slower than model.generate (~1.5-2 min)
#   bash benchmarks/gpu_check.sh --diagnose --profile  # the same plus sampler micro-benchmark and profiler
# PYTHON picks the interpreter (default python3, the one holding torch on the GPU machine).
# With $OUT set, the log goes to $OUT/gpu_check.log and the script writes gpu_check.txt/.json there.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # caiflow from this tree, not an installed copy
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
    "$PY" benchmarks/gpu_check.py "$@"
fi
