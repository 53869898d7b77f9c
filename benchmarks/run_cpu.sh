#!/usr/bin/env bash
# Regenerates the CPU benchmark: benchmarks/results/cpu.json (every figure,
# the machine and the command), cpu.md (the table) and cpu.png (the ratios,
# when matplotlib is installed). Run from anywhere, on a quiet machine:
#   benchmarks/run_cpu.sh [extra bench arguments, e.g. --rounds 31]
# Uses $PYTHON (default: python on PATH, e.g. an activated venv) and the
# lowrank_ext found on PYTHONPATH (the checkout by default).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}"
out=benchmarks/results
mkdir -p "$out"
plot=()
if "${PYTHON:-python}" -c "import matplotlib" 2>/dev/null; then
    plot=(--plot "$out/cpu.png")
fi
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"${PYTHON:-python}" -m lowrank_ext bench --device cpu --rounds 11 \
    --json "$out/cpu.json" --markdown "$out/cpu.md" "${plot[@]}" "$@"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
