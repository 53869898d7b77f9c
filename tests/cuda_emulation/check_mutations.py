"""Shows that the CUDA emulation catches real kernel bugs.

Each mutation below plants one bug in a copy of csrc/cuda (a missing barrier
or wait, a dropped bounds check, a wrong tail, an undersized shared-memory
plan); the emulated runner must then fail at least one of a small set of
cases, by a wrong or NaN output, an AddressSanitizer report or a broken
emulation rule. Not part of the test run (about six minutes on two cores):

    python tests/cuda_emulation/check_mutations.py [INDEX ...]

Exits non-zero if a mutation goes unnoticed.
"""

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

TC, SK, PLAN = "tensor_core_fused.cuh", "split_k.cuh", "lowrank_plan.cpp"
# (file, text, replacement)
MUTATIONS = [
    (TC, "    wait_for_oldest_slice(stages);\n    // The slice of `step` is visible to all, and "
         "every warp is done with the\n    // buffer that the next load overwrites (it held "
         "step - 1).\n    __syncthreads();",
     "    wait_for_oldest_slice(stages);"),
    (TC, "    cp_async_wait<1>();", "    cp_async_wait<2>();"),
    (TC, "      const bool inside = rr < rows && cc < cols;", "      const bool inside = rr < rows;"),
    (TC, "(rr < rows && cc < cols) ? g[rr * ld + cc]", "(rr < rows) ? g[rr * ld + cc]"),
    (TC, "      if (row < p.M && col < p.d) {", "      if (row < p.M) {"),
    (TC, "          if (bias != nullptr && col + e < p.d) {", "          if (bias != nullptr) {"),
    (TC, "  cp_async_wait<0>(); // nothing may be in flight when the block exits", ""),
    (TC, "    // B slice of `step` and (first step) the whole t tile are visible; the\n"
         "    // buffer the next load overwrites is no longer read.\n    __syncthreads();", ""),
    (TC, "      if (t_out != nullptr && rr < rows && cc < p.r) {",
     "      if (t_out != nullptr && rr < rows) {"),
    (SK, "      s += partial[(sp * M + i0 + i) * r + j];",
     "      s += sp + 1 < splits ? partial[(sp * M + i0 + i) * r + j] : 0;"),
    (SK, "(rank0 + kSkRankRowsPerBlock) < r ? (rank0 + kSkRankRowsPerBlock) : r;",
     "(rank0 + kSkRankRowsPerBlock - 1) < r ? (rank0 + kSkRankRowsPerBlock - 1) : r;"),
    (SK, "  for (int offset = width / 2; offset > 0; offset /= 2) {",
     "  for (int offset = width / 4; offset > 0; offset /= 2) {"),
    (SK, "  __syncthreads();\n\n  const int warp = threadIdx.x / 32;\n  const int lane = "
         "threadIdx.x % 32;\n  const int nwarps = blockDim.x / 32;\n  for (int64_t j",
     "\n  const int warp = threadIdx.x / 32;\n  const int lane = threadIdx.x % 32;\n"
     "  const int nwarps = blockDim.x / 32;\n  for (int64_t j"),
    (SK, "    if (valid) {\n      const T* b = B + o * r;", "    if (true) {\n      const T* b = B + o * r;"),
    (PLAN, "  t.smem_bytes = t.buf_offset + stages * slot;",
     "  t.smem_bytes = t.buf_offset + stages * slot - 256;"),
    (PLAN, "  t.buf_offset = t.t_offset + round_up(t_tile, kSmemAlign);",
     "  t.buf_offset = t.t_offset + round_up(t_tile, kSmemAlign) - 128;"),
    (PLAN, "  s.expand_smem = kSkRows * p.r * p.acc_bytes;",
     "  s.expand_smem = kSkRows * p.r * p.acc_bytes - 64;"),
    (PLAN, "  s.splits = ceil_div(p.k, s.k_chunk);", "  s.splits = p.k / s.k_chunk;"),
]

# Fields as in run_kernels.cpp.
CASES = """\
tensor_core bfloat16 67 72 40 70 0 0 1 1 wait h100
tensor_core float16 67 300 256 70 0 0 1 1 wait a100
tensor_core float16 130 97 17 71 5 1 1 1 issue h100
tensor_core bfloat16 65 300 64 150 0 0 1 1 issue h100
tensor_core bfloat16 20 65 24 63 0 0 1 1 wait small
tensor_core float16 70 96 40 72 0 0 1 1 issue h100
split_k float32 3 1000 24 100 0 0 1 1 wait h100
split_k float16 16 33 9 40 1 1 1 1 issue small
split_k float64 4 4096 33 67 0 0 1 1 issue small
split_k bfloat16 5 64 16 1000 0 0 0 1 issue small
split_k float32 1 300 3 67 0 0 1 1 issue h100
"""


def caught(index, workdir):
    name, old, new = MUTATIONS[index]
    sources = os.path.join(workdir, f"m{index}")
    shutil.copytree(os.path.join(ROOT, "csrc", "cuda"), sources)
    path = os.path.join(sources, name)
    with open(path) as f:
        text = f.read()
    if text.count(old) != 1:
        raise SystemExit(f"mutation {index}: its text is no longer in {name}; update it")
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    exe = os.path.join(sources, "run_kernels")
    build = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-g", "-pthread", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=undefined", "-Wno-unknown-pragmas",
         "-I", os.path.join(HERE, "shim"), "-I", sources,
         os.path.join(HERE, "run_kernels.cpp"), os.path.join(sources, "lowrank_plan.cpp"),
         "-o", exe], capture_output=True, text=True)
    if build.returncode != 0:
        raise SystemExit(f"mutation {index} does not compile:\n{build.stderr[-2000:]}")
    try:
        run = subprocess.run([exe], input=CASES, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    except subprocess.TimeoutExpired:
        return "a deadlock (timeout)"
    failed = [line for line in run.stdout.splitlines() if not line.startswith("PASS")]
    if run.returncode == 0 and not failed:
        return None
    reports = [line for line in run.stderr.splitlines()
               if "emulated GPU" in line or "ERROR: AddressSanitizer" in line
               or "runtime error" in line]
    return (failed + reports + [f"exit status {run.returncode}"])[0]


def main(argv):
    indices = [int(a) for a in argv] or range(len(MUTATIONS))
    missed = []
    with tempfile.TemporaryDirectory() as workdir:
        for i in indices:
            how = caught(i, workdir)
            print(f"mutation {i} ({MUTATIONS[i][0]}): " + (f"caught: {how}" if how else "MISSED"),
                  flush=True)
            if how is None:
                missed.append(i)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
