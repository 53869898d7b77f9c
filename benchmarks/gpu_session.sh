#!/usr/bin/env bash
# One session on a GPU machine: build lowrank_ext with its CUDA kernels, check
# that they loaded, run the CUDA tests, compute-sanitizer on small cases and
# the GPU benchmark, all in one command.
#
#   OUT=/somewhere bash benchmarks/gpu_session.sh [GROUP...]
#
# GROUPs, run in this order: build check test sanitize bench paths all_tests
# (default: build check test sanitize bench). A lent machine is given back
# soon after each command, and starting another costs minutes of the same
# device time, so the default runs everything that matters in one command;
# `paths` and `all_tests` are for a machine held longer.
# The whole script stays inside BUDGET_S seconds (default 540): each step's
# timeout is cut to what is left, so that the summary is always written, and
# the steps come in the order of what a short session must not miss.
#
# What comes back is kept to a few files in $OUT: summary.txt (one line per
# step with its exit status and seconds), logs.tgz (every step's log, the
# environment, the JUnit XML) and the benchmarks' JSON. Every step runs even
# when an earlier one fails; the script exits non-zero if any failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_session_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the steps run from the repository root
LOGS=$(mktemp -d)
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
cd "$ROOT"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
# Build only for the GPU in this machine unless told otherwise.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-16}
export LOWRANK_EXT_CUDA=1
export PYTHONUNBUFFERED=1

failed=0
# step NAME TIMEOUT_S COMMAND...: runs COMMAND (cut to the budget left), log
# in $LOGS/NAME.log, a line in summary.txt.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS - 15))
  if [ "$left" -lt 10 ]; then
    echo "$name skipped: no time left in BUDGET_S=$BUDGET_S" | tee -a "$OUT/summary.txt"
    failed=1
    return 0
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  local start=$SECONDS
  echo "== $name (at most ${limit}s): $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$LOGS/$name.log"
  if [ "$rc" -ne 0 ]; then failed=1; fi
  return 0
}

GROUPS_TO_RUN=${*:-build check test sanitize bench}
wanted() { [[ " $GROUPS_TO_RUN " == *" $1 "* ]]; }

echo "== groups: $GROUPS_TO_RUN ($(date -u))" >>"$OUT/summary.txt"
{
  date
  nvidia-smi
  nvcc --version
  "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} >"$LOGS/environment.txt" 2>&1

if wanted build; then
  # --no-deps: the machine may have no network; torch and friends are already there.
  step build 300 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
if wanted check; then
  # The tests skip (rather than fail) where the CUDA kernels did not load, so
  # that a build whose library failed to load would pass them all: fail here.
  step check_cuda_kernels 60 "$PY" -c "
import json, torch, lowrank_ext
from lowrank_ext import _backend
info = lowrank_ext.backend_info()
print(json.dumps(info, default=str, indent=1))
assert torch.cuda.is_available(), 'no CUDA GPU visible'
assert _backend.build_info.get('cuda'), f'CUDA kernels not loaded: {_backend.fallback_reason}'
assert info['cuda'], 'CUDA kernels not registered for every op'
"
fi
if wanted test; then
  step test_cuda 200 "$PY" -m pytest -q -rs tests/test_cuda.py --junitxml="$LOGS/test_cuda.xml"
fi

# Without the caching allocator every tensor is its own allocation, so an
# out-of-bounds access cannot land silently in a neighbouring cached block.
# (compute-sanitizer has refused the H200 machines with "Device not
# supported": that is the tool, not the kernels.)
# Only this package's kernels are instrumented (torch's and cuBLAS's would
# take most of the time, and initcheck reports on them); the option's name
# has changed between releases of the tool, so it is looked up.
if wanted sanitize; then
  help=$(compute-sanitizer --help 2>&1)
  if grep -q -- "--kernel-name" <<<"$help"; then
    only_ours=(--kernel-name kns=lowrank_ext)
  elif grep -q -- "--filter" <<<"$help"; then
    only_ours=(--filter kns=lowrank_ext)
  else
    only_ours=()
  fi
  for tool in memcheck racecheck synccheck; do
    step "sanitizer_$tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" ${only_ours[@]+"${only_ours[@]}"} --error-exitcode 1 \
      "$PY" benchmarks/cuda_sanitizer_case.py
  done
fi
if wanted bench; then
  # Without the torch.compile side, which recompiles for every problem.
  step bench_cuda 150 "$PY" -m lowrank_ext bench --device cuda --sides ours,compose,dense \
    --json "$OUT/bench_cuda.json"
  step bench_cuda_lora 60 "$PY" -m lowrank_ext bench --device cuda --op lora \
    --modes fwd --sides ours,compose,dense --json "$OUT/bench_cuda_lora.json"
fi
if wanted paths; then
  # Every CUDA path at each shape, to tune the automatic choice.
  step bench_cuda_paths 480 "$PY" benchmarks/cuda_paths_bench.py --json "$OUT/cuda_paths.json"
fi
if wanted all_tests; then
  step test_all 520 "$PY" -m pytest -q -rs tests --junitxml="$LOGS/test_all.xml"
fi

# One archive of the logs (the tool brings back at most 8 files).
tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
echo "== summary"
cat "$OUT/summary.txt"
exit "$failed"
