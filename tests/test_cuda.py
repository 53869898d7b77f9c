"""CUDA kernels of lowrank_ext.

The registration and planning tests need only a build with CUDA kernels (no
GPU); everything else needs a GPU and skips without one.
"""

import math

import pytest
import torch

from lowrank_ext import _backend, _checks
from lowrank_ext._library import SCHEMAS, ops

HAS_CUDA = torch.cuda.is_available()
CUDA_BUILD = bool(_backend.build_info.get("cuda"))

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_cuda_build = pytest.mark.skipif(
    not CUDA_BUILD, reason="lowrank_ext._C was built without CUDA kernels")
requires_cuda_kernels = pytest.mark.skipif(
    not (HAS_CUDA and CUDA_BUILD), reason="needs a CUDA GPU and the CUDA kernels")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
# Tolerances against a float64 reference; outputs are O(1) by construction.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}
PATHS = ["auto", "tensor_core", "split_k", "cublas"]
RANKS = [1, 2, 8, 16, 64, 128, 256]
ROWS = [0, 1, 3, 16, 17, 1000, 8192]


H100_SMEM = 227 * 1024  # opt-in shared memory per block
A100_SMEM = 163 * 1024
SM86_SMEM = 99 * 1024


def _plan(M, k, r, d, dtype=torch.bfloat16, sm=9, sms=132, smem=H100_SMEM, path="auto",
          tensor_core_built=True, kernels_built=True):
    name, fields = torch.ops.lowrank_ext_internal.cuda_plan(
        M, k, r, d, dtype, sm, sms, smem, path, tensor_core_built, kernels_built)
    keys = ["frags_per_warp", "warps_n", "rank_padded", "threads", "blocks",
            "stages", "ring_stage_elems", "stage_offset", "t_offset", "buf_offset", "smem_bytes",
            "splits", "k_chunk", "rank_groups", "row_groups", "shrink_smem",
            "expand_cols", "expand_blocks", "lanes_per_col", "expand_smem"]
    return name, dict(zip(keys, fields))


# --- no GPU needed ---------------------------------------------------------------------

@requires_cuda_build
# Internal ops (a leading underscore, such as the CPU backward's _weight_grad)
# run on the pure-torch default off the CPU.
@pytest.mark.parametrize("name", sorted(n for n in SCHEMAS if not n.startswith("_")))
def test_every_op_has_a_cuda_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_ext::{name}", "CUDA")


@requires_cuda_build
def test_path_forcing_op_has_a_cuda_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "lowrank_ext_internal::lowrank_linear_cuda_path", "CUDA")


@requires_cuda_build
@pytest.mark.parametrize("M,k,r,d,dtype,sm,expected", [
    (0, 64, 8, 64, torch.bfloat16, 9, "empty"),
    (5, 0, 8, 64, torch.bfloat16, 9, "bias_only"),
    (5, 64, 0, 64, torch.float32, 9, "bias_only"),
    (1, 4096, 16, 4096, torch.bfloat16, 9, "split_k"),
    (16, 4096, 64, 4096, torch.float16, 9, "split_k"),
    (1, 4096, 16, 4096, torch.float32, 9, "split_k"),
    (3, 4096, 16, 4096, torch.float64, 9, "split_k"),
    (17, 4096, 64, 4096, torch.bfloat16, 9, "cublas"),  # too few row tiles
    (64 * 65, 4096, 64, 4096, torch.bfloat16, 9, "cublas"),
    (64 * 66, 4096, 64, 4096, torch.bfloat16, 9, "tensor_core"),  # 66 = 132 SMs / 2
    (8192, 4096, 64, 4096, torch.bfloat16, 9, "tensor_core"),
    (8192, 4096, 256, 4096, torch.float16, 8, "tensor_core"),
    (8192, 4096, 64, 4096, torch.float32, 9, "cublas"),
    (8192, 4096, 64, 4096, torch.float64, 9, "cublas"),
    (8192, 4096, 257, 4096, torch.bfloat16, 9, "cublas"),
    (1, 4096, 300, 4096, torch.bfloat16, 9, "cublas"),
    (8192, 4096, 64, 4096, torch.float16, 7, "cublas"),
])
def test_plan_picks_the_expected_path(M, k, r, d, dtype, sm, expected):
    assert _plan(M, k, r, d, dtype, sm)[0] == expected


@requires_cuda_build
def test_plan_avoids_a_fused_kernel_the_build_lacks():
    # A binary without sm_80+ code for the GPU (e.g. built for "7.5+PTX") holds
    # an empty fused kernel: the plan must take cuBLAS, and forcing it must fail.
    assert _plan(8192, 4096, 64, 4096)[0] == "tensor_core"
    assert _plan(8192, 4096, 64, 4096, tensor_core_built=False)[0] == "cublas"
    assert _plan(1, 4096, 16, 4096, tensor_core_built=False)[0] == "split_k"
    with pytest.raises(ValueError, match="no sm_80\\+ code"):
        _plan(8192, 4096, 64, 4096, path="tensor_core", tensor_core_built=False)


@requires_cuda_build
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,r", [(1, 16), (16, 64), (8192, 64), (100, 300)])
def test_plan_runs_cublas_on_a_gpu_the_build_has_no_code_for(M, r, dtype):
    # The default "8.0;9.0+PTX" build on a V100 or T4 loads none of the
    # extension's kernels: every problem goes to cuBLAS, and forcing one of
    # the extension's own paths says why it cannot run.
    no_code = dict(sm=7, smem=64 * 1024, tensor_core_built=False, kernels_built=False)
    assert _plan(M, 4096, r, 4096, dtype, **no_code)[0] == "cublas"
    assert _plan(M, 4096, r, 4096, dtype, path="cublas", **no_code)[0] == "cublas"
    for path in ("split_k", "tensor_core"):
        with pytest.raises(ValueError, match="this build has no code for this GPU"):
            _plan(M, 4096, r, 4096, dtype, path=path, **no_code)
    assert _plan(0, 4096, r, 4096, dtype, **no_code)[0] == "empty"


@requires_cuda_build
def test_plan_falls_back_when_shared_memory_is_short():
    assert _plan(8192, 4096, 256, 4096, sm=8, smem=SM86_SMEM)[0] == "cublas"
    assert _plan(8192, 4096, 128, 4096, sm=8, smem=SM86_SMEM)[0] == "tensor_core"
    with pytest.raises(ValueError, match="tensor_core path cannot run"):
        _plan(8192, 4096, 256, 4096, sm=8, smem=SM86_SMEM, path="tensor_core")


@requires_cuda_build
@pytest.mark.parametrize("smem", [H100_SMEM, A100_SMEM])
@pytest.mark.parametrize("r", list(range(1, 257)))
def test_tensor_core_tiling_covers_the_rank(r, smem):
    name, p = _plan(1000, 4096, r, 4096, sm=8, smem=smem, path="tensor_core")
    assert name == "tensor_core"
    assert p["rank_padded"] >= r and p["rank_padded"] % 16 == 0
    assert p["rank_padded"] == p["warps_n"] * p["frags_per_warp"] * 16
    assert p["frags_per_warp"] in (1, 2, 4, 8)
    assert p["threads"] == 128 * p["warps_n"] and p["threads"] <= 256
    assert p["blocks"] == math.ceil(1000 / 64)
    warps = p["threads"] // 32
    # Regions are 128-byte aligned, large enough, and fit one block per SM on sm_80.
    assert p["t_offset"] % 128 == 0 and p["buf_offset"] % 128 == 0
    assert p["t_offset"] >= warps * 16 * 16 * 4
    assert p["buf_offset"] - p["t_offset"] >= 64 * (p["rank_padded"] + 8) * 2
    # Each ring slot holds an x and an A slice, or a B slice, and stays aligned.
    slot = p["ring_stage_elems"] * 2
    assert p["stages"] in (2, 3) and slot % 128 == 0
    assert slot >= (64 + p["rank_padded"]) * (64 + 8) * 2
    assert slot >= 64 * (p["rank_padded"] + 8) * 2
    assert p["smem_bytes"] == p["buf_offset"] + p["stages"] * slot <= smem


@requires_cuda_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 1000])
@pytest.mark.parametrize("k", [1, 31, 64, 4096, 5000, 65536])
@pytest.mark.parametrize("r", [1, 3, 16, 256])
@pytest.mark.parametrize("sms", [1, 132])
def test_split_k_tiling_covers_k_r_and_d(dtype, M, k, r, sms):
    d = 4099
    name, p = _plan(M, k, r, d, dtype, sms=sms, path="split_k")
    assert name == "split_k"
    assert p["k_chunk"] % 32 == 0
    assert p["splits"] * p["k_chunk"] >= k > (p["splits"] - 1) * p["k_chunk"]
    assert p["rank_groups"] * 8 >= r and p["row_groups"] * 16 >= M
    assert p["expand_blocks"] * p["expand_cols"] >= d
    assert p["expand_cols"] % 32 == 0
    lanes = p["lanes_per_col"]
    assert lanes & (lanes - 1) == 0 and min(r, 32) <= lanes <= 32
    acc = 8 if dtype == torch.float64 else 4
    assert p["shrink_smem"] == 16 * p["k_chunk"] * acc <= 48 * 1024
    assert p["expand_smem"] == 16 * r * acc <= 48 * 1024


@requires_cuda_build
def test_plan_rejects_impossible_forced_paths():
    with pytest.raises(ValueError, match="tensor_core path cannot run"):
        _plan(100, 64, 8, 64, torch.float32, path="tensor_core")
    with pytest.raises(ValueError, match="tensor_core path cannot run"):
        _plan(100, 64, 8, 64, torch.float16, sm=7, path="tensor_core")
    with pytest.raises(ValueError, match="split_k path cannot run"):
        _plan(1, 64, 257, 64, torch.float32, path="split_k")
    with pytest.raises(ValueError, match="unknown CUDA path"):
        _plan(1, 64, 8, 64, path="fastest")


# --- GPU ---------------------------------------------------------------------------------

@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _inputs(M, k, r, d, dtype, bias=True, lead=None, device="cuda"):
    """O(1) outputs: A and B are scaled by 1/sqrt of their inner dimension."""
    shape = (M, k) if lead is None else (*lead, k)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    A = torch.randn(r, k, dtype=torch.float64, device=device) / math.sqrt(max(k, 1))
    B = torch.randn(d, r, dtype=torch.float64, device=device) / math.sqrt(max(r, 1))
    b = torch.randn(d, dtype=torch.float64, device=device) if bias else None
    return [None if t is None else t.to(dtype) for t in (x, A, B, b)]


def _reference(x, A, B, bias):
    x, A, B = x.double(), A.double(), B.double()
    t = x @ A.T
    y = t @ B.T
    if bias is not None:
        y = y + bias.double()
    return y, t


def _poison_allocator(*shapes, dtype):
    """Leaves NaN-filled blocks of these sizes in the caching allocator, so an
    output that reuses one and misses an element is caught as NaN."""
    blocks = [torch.full(s, float("nan"), dtype=dtype, device="cuda") for s in shapes]
    del blocks


def _run(path, x, A, B, bias):
    if path == "auto":
        return ops.lowrank_linear_with_intermediate.default(x, A, B, bias)
    return torch.ops.lowrank_ext_internal.lowrank_linear_cuda_path(x, A, B, bias, path)


def _path_can_run(path, dtype, r):
    if path == "tensor_core":
        return dtype in HALF and r <= 256 and torch.cuda.get_device_capability()[0] >= 8
    if path == "split_k":
        return r <= 256
    return True


def _check_against_reference(path, M, k, r, d, dtype, bias=True):
    if not _path_can_run(path, dtype, r):
        pytest.skip(f"{path} does not run {dtype} r={r}")
    x, A, B, b = _inputs(M, k, r, d, dtype, bias)
    inputs_before = [t.clone() for t in (x, A, B) + ((b,) if b is not None else ())]
    _poison_allocator((M, d), (M, r), dtype=dtype)
    y, t = _run(path, x, A, B, b)
    torch.cuda.synchronize()
    y_ref, t_ref = _reference(x, A, B, b)
    assert y.shape == (M, d) and y.dtype == dtype and y.device == x.device
    assert t.shape == (M, r) and t.dtype == dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) output elements"
    assert torch.isfinite(t).all(), "unwritten (NaN) intermediate elements"
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    torch.testing.assert_close(t.double(), t_ref, **TOL[dtype])
    for before, now in zip(inputs_before, (x, A, B, b)):
        assert torch.equal(before, now), "an input was modified"
    # Without the intermediate (the kernel skips writing it) y is the same.
    _poison_allocator((M, d), dtype=dtype)
    if path == "auto":
        y2 = ops.lowrank_linear.default(x, A, B, b)
    else:
        y2, no_t = torch.ops.lowrank_ext_internal.lowrank_linear_cuda_path(
            x, A, B, b, path, False)
        assert no_t is None
    assert torch.isfinite(y2).all(), "unwritten (NaN) output elements"
    torch.testing.assert_close(y2.double(), y_ref, **TOL[dtype])


@requires_cuda_kernels
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("M", ROWS)
def test_rows_and_ranks_match_float64(M, r, path, dtype):
    # k and d are not multiples of the tile sizes (64): tails in both.
    _check_against_reference(path, M, 200, r, 136, dtype)


@requires_cuda_kernels
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_with_tails_match_float64(seed, path, dtype):
    g = torch.Generator().manual_seed(seed)
    M = int(torch.randint(1, 300, (1,), generator=g))
    k = int(torch.randint(1, 700, (1,), generator=g))
    r = int(torch.randint(1, 257, (1,), generator=g))
    d = int(torch.randint(1, 300, (1,), generator=g))
    _check_against_reference(path, M, k, r, d, dtype, bias=seed % 2 == 0)


@requires_cuda_kernels
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,k,r,d", [(1, 4096, 16, 4096), (16, 4096, 64, 4096),
                                     (8192, 4096, 64, 4096), (3, 65536, 8, 64)])
def test_benchmark_shapes_match_float64(M, k, r, d, dtype):
    _check_against_reference("auto", M, k, r, d, dtype)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("r", [8, 20, 32, 100])
@pytest.mark.parametrize("M", [5, 300])
def test_an_infinite_input_gives_infinity_not_nan(M, r, path, dtype):
    # Every input in [0, 1) but x[0, 0] = +inf: row 0 of y is +inf on every
    # path. (The fused kernel's rank padding once turned it into NaN.)
    if not _path_can_run(path, dtype, r):
        pytest.skip(f"{path} does not run {dtype} r={r}")
    x, A, B, b = (torch.rand(*s, device="cuda").to(dtype)
                  for s in ((M, 40), (r, 40), (48, r), (48,)))
    x[0, 0] = float("inf")
    y, _ = _run(path, x, A, B, b)
    y_ref, _ = _reference(x, A, B, b)
    assert torch.isposinf(y[0]).all() and torch.isposinf(y_ref[0]).all()
    torch.testing.assert_close(y[1:].double(), y_ref[1:], **TOL[dtype])


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_zero_rank_and_zero_k_give_the_bias(path, dtype):
    for k, r in [(0, 8), (32, 0)]:
        x, A, B, b = _inputs(5, k, r, 24, dtype)
        y, t = _run(path, x, A, B, b)
        torch.testing.assert_close(y, b.expand(5, 24))
        assert t.shape == (5, r) and (t == 0).all()
        y = ops.lowrank_linear.default(x, A, B, None)
        assert (y == 0).all()


@requires_cuda_kernels
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_layouts_leading_dims_and_alignment(path, dtype):
    if not _path_can_run(path, dtype, 24):
        pytest.skip(f"{path} does not run {dtype}")
    k, r, d = 96, 24, 72
    x, A, B, b = _inputs(40, k, r, d, dtype)
    cases = {
        "leading dims": x.reshape(2, 4, 5, k),
        "no leading dims": x[0],
        "zero-size leading dim": x[:0].reshape(2, 0, k),
        "strided columns": torch.cat([x, x], dim=1)[:, ::2],
        "transposed storage": x.T.contiguous().T,
        "broadcast rows (stride 0)": x[:1].expand(40, k),
        "misaligned base": torch.cat([x.flatten(), x.flatten()])[1:1 + x.numel()].view(40, k),
        "odd row stride": torch.cat([x, x[:, :1]], dim=1)[:, :k],
    }
    factors = {
        "contiguous": (A, B, b),
        "transposed factors": (A.T.contiguous().T, B.T.contiguous().T, b),
        "strided bias": (A, B, torch.stack([b, b], 1)[:, 0]),
    }
    for xname, xc in cases.items():
        for fname, (Ac, Bc, bc) in factors.items():
            y, t = _run(path, xc, Ac, Bc, bc)
            y_ref, t_ref = _reference(xc, Ac, Bc, bc)
            assert y.shape == (*xc.shape[:-1], d), (xname, fname)
            torch.testing.assert_close(y.double(), y_ref, **TOL[dtype], msg=f"{xname}, {fname}")
            torch.testing.assert_close(t.double(), t_ref, **TOL[dtype], msg=f"{xname}, {fname}")


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_is_deterministic(dtype):
    x, A, B, b = _inputs(7, 8192, 64, 512, dtype)
    first, _ = _run("split_k", x, A, B, b)
    for _ in range(5):
        again, _ = _run("split_k", x, A, B, b)
        assert torch.equal(first, again)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_errors_match_the_fallback(dtype):
    x, A, B, b = _inputs(4, 16, 4, 8, dtype)
    bad_calls = [
        (x, A.cpu(), B, b),
        (x, A, B.to(torch.float32 if dtype != torch.float32 else torch.float64), b),
        (x, A[:, :-1], B, b),
        (x, A, B[:, :-1], b),
        (x, A, B, b[:-1]),
    ]
    for args in bad_calls:
        with pytest.raises(Exception) as expected:
            _checks.check_lowrank_linear_inputs("lowrank_linear", *args)
        with pytest.raises(type(expected.value)) as got:
            ops.lowrank_linear.default(*args)
        assert str(got.value).splitlines()[0] == str(expected.value).splitlines()[0]


# Every path is forced in turn: at these sizes "auto" alone would never run
# the fused kernel (too few row tiles to fill the GPU).
@requires_cuda_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [3, 300])
def test_cuda_graph_capture_and_replay(M, dtype, path):
    if not _path_can_run(path, dtype, 16):
        pytest.skip(f"{path} does not run {dtype}")
    x, A, B, b = _inputs(M, 256, 16, 128, dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        _run(path, x, A, B, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, t = _run(path, x, A, B, b)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        y_ref, t_ref = _reference(x, A, B, b)
        torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
        torch.testing.assert_close(t.double(), t_ref, **TOL[dtype])


@requires_cuda_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [3, 300])
def test_runs_on_the_current_non_default_stream(M, dtype, path):
    if not _path_can_run(path, dtype, 32):
        pytest.skip(f"{path} does not run {dtype}")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x, A, B, b = _inputs(M, 512, 32, 256, dtype)
        # Queue work ahead so a kernel on the wrong stream would read stale inputs.
        torch.cuda._sleep(1_000_000)
        x.mul_(2)
        y, _ = _run(path, x, A, B, b)
    stream.synchronize()
    torch.testing.assert_close(y.double(), _reference(x, A, B, b)[0], **TOL[dtype])


@requires_cuda_kernels
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_on_a_second_gpu():
    x, A, B, b = _inputs(300, 128, 16, 64, torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        y = ops.lowrank_linear.default(x, A, B, b)
    assert y.device == x.device
    torch.testing.assert_close(y.double(), _reference(x, A, B, b)[0], **TOL[torch.bfloat16])


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [3, 70])
def test_opcheck(M, dtype):
    x, A, B, b = _inputs(M, 64, 8, 48, dtype)
    for grad in (False, True):
        args = [t.clone().requires_grad_(grad) for t in (x, A, B, b)]
        torch.library.opcheck(ops.lowrank_linear.default, tuple(args))
    # The forward half of autograd: not differentiable itself.
    torch.library.opcheck(ops.lowrank_linear_with_intermediate.default, (x, A, B, b))
    W = torch.randn(48, 64, device="cuda", dtype=dtype)
    torch.library.opcheck(ops.lora_linear.default, (x, W, A, B, b, 0.5))
    torch.library.opcheck(ops.lora_linear_with_intermediate.default, (x, W, A, B, b, 0.5))


@requires_cuda_kernels
@pytest.mark.parametrize("M", [3, 70])
def test_gradcheck_float64(M):
    x, A, B, b = _inputs(M, 24, 4, 12, torch.float64)
    args = [t.requires_grad_() for t in (x, A, B, b)]
    assert torch.autograd.gradcheck(lambda *a: ops.lowrank_linear.default(*a), args)


@requires_cuda_kernels
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [3, 300])
def test_backward_matches_float64(M, dtype):
    x, A, B, b = _inputs(M, 160, 16, 96, dtype)
    gy = torch.randn(M, 96, device="cuda", dtype=dtype)
    args = [t.clone().requires_grad_() for t in (x, A, B, b)]
    ops.lowrank_linear.default(*args).backward(gy)
    ref = [t.double().requires_grad_() for t in (x, A, B, b)]
    _reference(*ref)[0].backward(gy.double())
    for got, want in zip(args, ref):
        scale = want.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(got.grad.double() / scale, want.grad / scale, **TOL[dtype])


@requires_cuda_kernels
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 3, 300])
def test_lora_linear_matches_float64(M, dtype):
    x, A, B, b = _inputs(M, 128, 8, 64, dtype)
    W = (torch.randn(64, 128, device="cuda", dtype=torch.float64) / math.sqrt(128)).to(dtype)
    y, t = ops.lora_linear_with_intermediate.default(x, W, A, B, b, 0.5)
    xd = x.double()
    y_ref = xd @ W.double().T + b.double() + 0.5 * (xd @ A.double().T) @ B.double().T
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    torch.testing.assert_close(t.double(), xd @ A.double().T, **TOL[dtype])
    torch.testing.assert_close(ops.lora_linear.default(x, W, A, B, b, 0.5), y)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("balanced", [False, True])
def test_svd_truncate_on_cuda_matches_cpu(balanced, dtype):
    W = torch.randn(48, 32, dtype=torch.float64)
    W = (W @ torch.diag(torch.linspace(3, 0.1, 32, dtype=torch.float64))).to(dtype)
    B_gpu, A_gpu = ops.svd_truncate.default(W.cuda(), 8, balanced)
    B_cpu, A_cpu = ops.svd_truncate.default(W, 8, balanced)
    assert B_gpu.device.type == "cuda" and A_gpu.device.type == "cuda"
    assert B_gpu.dtype == dtype and A_gpu.dtype == dtype
    assert B_gpu.shape == (48, 8) and A_gpu.shape == (8, 32)
    # Singular vectors are defined up to sign: compare the products.
    tol = TOL[dtype] if dtype in HALF else TOL[torch.float32]
    torch.testing.assert_close(
        (B_gpu.double() @ A_gpu.double()).cpu(), B_cpu.double() @ A_cpu.double(), **tol)
    if balanced:
        # Both factors carry sqrt(S): column norms of B equal row norms of A.
        torch.testing.assert_close(B_gpu.double().norm(dim=0), A_gpu.double().norm(dim=1), **tol)


@requires_cuda_kernels
def test_svd_truncate_errors_on_cuda_match_cpu():
    W = torch.randn(6, 4)
    for rank in (0, 5):
        with pytest.raises(ValueError) as cpu:
            ops.svd_truncate.default(W, rank, False)
        with pytest.raises(ValueError) as gpu:
            ops.svd_truncate.default(W.cuda(), rank, False)
        assert str(gpu.value).splitlines()[0] == str(cpu.value).splitlines()[0]
