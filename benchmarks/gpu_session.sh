#!/usr/bin/env bash
# One session on a GPU machine: build lowrank_ext with its CUDA kernels, run
# the CUDA tests, compute-sanitizer on small cases, the GPU benchmark and the
# whole test suite. Logs and results go under $OUT (default
# ./gpu_session_out); summary.txt has one line per step with its exit status.
#
#   OUT=/somewhere bash benchmarks/gpu_session.sh [GROUP...]
#
# GROUPs (default: all, in this order): build test sanitize bench paths
# all_tests. Naming groups lets a session split the work across several
# shorter commands (the build stays in place between them). Every step runs
# even when an earlier one fails; the script exits non-zero if any failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_session_out}
mkdir -p "$OUT"
cd "$ROOT"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
# Build only for the GPU in this machine unless told otherwise.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-8}
export LOWRANK_EXT_CUDA=1

failed=0
# step NAME TIMEOUT_S COMMAND...: runs COMMAND, log in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then failed=1; fi
  return 0
}

GROUPS_TO_RUN=${*:-build test sanitize bench paths all_tests}
wanted() { [[ " $GROUPS_TO_RUN " == *" $1 "* ]]; }

touch "$OUT/summary.txt"
{
  date
  nvidia-smi
  nvcc --version
  python -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} >"$OUT/environment.txt" 2>&1

if wanted build; then
  # --no-deps: the machine may have no network; torch and friends are already there.
  step build 1800 pip install --no-build-isolation --no-deps -v -e .
fi
step backend_info 120 python -c "import lowrank_ext, json; print(json.dumps(lowrank_ext.backend_info(), default=str, indent=1))"
if wanted test; then
  step test_cuda 1800 python -m pytest -q -rs tests/test_cuda.py --junitxml="$OUT/test_cuda.xml"
fi

# Without the caching allocator every tensor is its own allocation, so an
# out-of-bounds access cannot land silently in a neighbouring cached block.
if wanted sanitize; then
  for tool in memcheck racecheck synccheck initcheck; do
    step "sanitizer_$tool" 1200 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python benchmarks/cuda_sanitizer_case.py
  done
fi
if wanted bench; then
  step bench_cuda 1800 python -m lowrank_ext bench --device cuda --json "$OUT/bench_cuda.json"
  step bench_cuda_lora 900 python -m lowrank_ext bench --device cuda --op lora \
    --modes fwd --sides ours,compose,dense --json "$OUT/bench_cuda_lora.json"
fi
if wanted paths; then
  # Every CUDA path at each shape, to tune the automatic choice.
  step bench_cuda_paths 1800 python benchmarks/cuda_paths_bench.py --json "$OUT/cuda_paths.json"
fi
if wanted all_tests; then
  step test_all 1800 python -m pytest -q -rs tests --junitxml="$OUT/test_all.xml"
fi

echo "== summary"
cat "$OUT/summary.txt"
exit "$failed"
