#!/usr/bin/env bash
# The project's one GPU command (issue 13): correctness at the real shapes, kernel timings,
# CUDA-graph capture under torch.compile, transformers end to end, one calibrated layer.
#   benchmarks/gpu_check.sh OUTDIR              # bare H100/H200: torch, triton, transformers; < 8 minutes
#   benchmarks/gpu_check.sh OUTDIR --dry-run    # CPU: every step in its CPU mode (interpreter, tiny shapes)
# Extra arguments go to benchmarks/gpu_check.py (--steps, --budget-s). Writes OUTDIR/results.json,
# OUTDIR/results.md and one log per step.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUTDIR [--dry-run] [--steps env,cost_model,...] [--budget-s SECONDS]" >&2
    exit 2
fi
out=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
# the source folders hold the import packages; nothing is installed on the GPU machine
export PYTHONPATH="$root:$root/kernels:$root/calibration:$root/toyvqa${PYTHONPATH:+:$PYTHONPATH}"
# the driver keeps its own budget (450 s); this is the hard stop at 8 minutes
exec timeout --kill-after=10 480 "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" --out "$out" "$@"
