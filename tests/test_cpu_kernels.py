"""Every CPU kernel path of lowrank_linear against a float64 reference.

The reference forms W = B·A in float64 here, from the very (rounded) inputs
the kernel sees, so only the kernel's own accumulation and output rounding
are measured. Both kernel families run: the AVX2 micro-kernels ("auto" on a
CPU that has AVX2) and the portable loops / BLAS blocks ("portable").

Shapes are chosen to reach each branch and each tail:
  * AVX2, few rows (threads split rank and outputs) and many rows (threads
    split row blocks), row chunks beyond one block, 3-row tile tails, 4-column
    tile tails of r and d, 64-output chunks, 8-lane tails of k and r, the
    1024-wide k chunks; the packed float32 shrink (many rows, r ≥ 16) with
    its 256-wide k chunks, 192-row sub-blocks, 16-rank panel tails and blocks
    beyond its 512-row cap; the panel expand's groups of panels and their tails;
  * portable: the per-row loops, the single-row split across threads, the
    BLAS row blocks with a partial last block.
"""

import pytest
import torch

import lowrank_ext
from conftest import DTYPES, TOLERANCES, requires_compiled

pytestmark = requires_compiled

KERNELS = ("auto", "avx2", "portable")
# _cpu_kernel reports the kernel set in use; these are the choices that select it.
CHOICE_FOR = {"avx512bf16": "auto", "avx2": "avx2", "portable": "portable"}

# (M, k, r, d, threads): comment says which path / tail it reaches.
SHAPES = [
    (1, 10, 2, 10, 2),          # the seed layer: k and r below one 8-lane vector
    (1, 4096, 16, 4096, 2),     # decode: rank and outputs split across threads
    (1, 2048, 17, 2051, 2),     # decode with rank / output tile tails
    (1, 1, 1, 1, 1),            # smallest
    (2, 9, 3, 5, 1),            # one thread, 2-row tile tail, 3-column tiles
    (5, 1025, 7, 66, 2),        # k just past a 1024 chunk, 8-lane tail of k
    (16, 4096, 64, 4096, 2),    # few rows with several threads; BLAS block (portable)
    (31, 300, 5, 130, 2),       # 64-output chunks with a 2-column tail
    (64, 257, 13, 67, 2),       # first row-block shape with two threads
    (200, 513, 8, 129, 2),      # row blocks with 3-row tails, partial BLAS block
    (200, 40, 6, 19, 8),        # few rows per thread with 8 threads: two row chunks
    (97, 2100, 33, 45, 1),      # one thread, several k chunks, r tail past 32
    (200, 300, 17, 50, 2),      # packed shrink: a 1-rank panel tail, k chunk 256 + 44
    (193, 1000, 40, 33, 1),     # packed, one thread: 192-row sub-block + 1, 8-rank panel tail
    (1100, 64, 16, 24, 2),      # packed: one exact panel, blocks past the 512-row cap
    (420, 75, 35, 40, 2),       # bfloat16 on AVX512-BF16: A packed into pairs, odd k
    # The panel expand packs B a group of 16-output panels at a time (64 KB):
    (70, 90, 100, 333, 2),      # groups of 10 panels: 160 + 160 + a 13-output tail
    (50, 64, 300, 530, 1),      # groups of 3 panels: eleven of 48 outputs, then 2
    (40, 33, 8, 600, 1),        # groups capped at 16 panels: 256 + 256 + 88 (5 panels + 8)
]


@pytest.fixture(params=KERNELS)
def kernel(request):
    previous = torch.ops.lowrank_ext._cpu_kernel("")
    active = torch.ops.lowrank_ext._cpu_kernel(request.param)
    yield active
    torch.ops.lowrank_ext._cpu_kernel(CHOICE_FOR[previous])


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def make(M, k, r, d, dtype, bias=True, lead=None):
    shape = (M, k) if lead is None else (*lead, k)
    x = torch.randn(shape).to(dtype)
    A = (torch.randn(r, k) * max(k, 1) ** -0.5).to(dtype)
    B = (torch.randn(d, r) * max(r, 1) ** -0.5).to(dtype)
    b = torch.randn(d).to(dtype) if bias else None
    return x, A, B, b


def reference(x, A, B, bias):
    W = B.double() @ A.double()  # dense W, formed only in the test
    y = x.double() @ W.T
    return y if bias is None else y + bias.double()


def assert_matches(y, ref, dtype):
    tol = TOLERANCES[dtype]
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,k,r,d,nthreads", SHAPES)
def test_paths_match_float64_reference(kernel, threads, dtype, M, k, r, d, nthreads):
    threads(nthreads)
    x, A, B, bias = make(M, k, r, d, dtype)
    copies = [t.clone() for t in (x, A, B, bias)]
    y = lowrank_ext.lowrank_linear(x, A, B, bias)
    assert_matches(y, reference(x, A, B, bias), dtype)
    for before, after in zip(copies, (x, A, B, bias)):
        assert torch.equal(before, after), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,k,r,d,nthreads", [(1, 4096, 16, 4096, 2), (7, 33, 5, 9, 1),
                                              (130, 600, 12, 70, 2), (250, 300, 20, 40, 2)])
def test_intermediate_and_no_bias(kernel, threads, dtype, M, k, r, d, nthreads):
    threads(nthreads)
    x, A, B, _ = make(M, k, r, d, dtype, bias=False)
    y, t = torch.ops.lowrank_ext.lowrank_linear_with_intermediate(x, A, B, None)
    assert_matches(y, reference(x, A, B, None), dtype)
    assert_matches(t, x.double() @ A.double().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_stride", "transposed", "broadcast_rows",
                                    "leading_dims", "weights_transposed", "scalar_row"])
@pytest.mark.parametrize("M", [1, 70, 200, 400])
def test_layouts(kernel, dtype, layout, M):
    # 200 rows, r = 18: the packed float32 shrink; 400 rows, r = 40: the
    # bfloat16 shrink over packed A as well
    k, d = 37, 23
    r = 40 if M >= 400 else 18 if M >= 192 else 6
    x, A, B, bias = make(M, k, r, d, dtype)
    if layout == "row_stride":  # rows read in place with a stride > k
        x = torch.randn(M, k + 11).to(dtype)[:, 3:3 + k]
    elif layout == "transposed":  # unit column stride missing: copied once
        x = torch.randn(k, M).to(dtype).T
    elif layout == "broadcast_rows":  # stride-0 rows
        x = torch.randn(1, k).to(dtype).expand(M, k)
    elif layout == "leading_dims":
        x = torch.randn(2, M, 1, k).to(dtype)
    elif layout == "weights_transposed":
        A = torch.randn(k, r).to(dtype).T
        B = torch.randn(r, d).to(dtype).T
        bias = torch.randn(2 * d).to(dtype)[::2]
    elif layout == "scalar_row":  # x of shape (k,): no leading dims
        x = torch.randn(k).to(dtype)
    y = lowrank_ext.lowrank_linear(x, A, B, bias)
    assert_matches(y, reference(x, A, B, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,k,r,d", [(0, 5, 3, 4), (3, 0, 2, 4), (3, 5, 0, 4), (3, 5, 2, 0),
                                     (0, 0, 0, 0), (400, 0, 40, 7)])
def test_zero_sizes(kernel, dtype, M, k, r, d):
    x, A, B, bias = make(M, k, r, d, dtype)
    y, t = torch.ops.lowrank_ext.lowrank_linear_with_intermediate(x, A, B, bias)
    assert y.shape == (M, d) and t.shape == (M, r)
    assert_matches(y, reference(x, A, B, bias), dtype)


def test_kernel_switch_reports_and_rejects():
    current = torch.ops.lowrank_ext._cpu_kernel("")
    assert current in ("avx512bf16", "avx2", "portable")
    with pytest.raises(RuntimeError, match="_cpu_kernel: expected"):
        torch.ops.lowrank_ext._cpu_kernel("sse9")
    assert torch.ops.lowrank_ext._cpu_kernel("") == current
    try:
        # Each choice is a ceiling: "avx2" never reports AVX-512, "portable" nothing faster.
        assert torch.ops.lowrank_ext._cpu_kernel("avx2") in ("avx2", "portable")
        assert torch.ops.lowrank_ext._cpu_kernel("portable") == "portable"
    finally:
        torch.ops.lowrank_ext._cpu_kernel(CHOICE_FOR[current])
    assert torch.ops.lowrank_ext._cpu_kernel("") == current


def bf16_intermediate_reference(x, A, B, bias):
    """What the AVX512-BF16 path computes: t = x·Aᵀ exactly, rounded to bfloat16
    (as torch's composition of two bfloat16 matmuls rounds it), then expanded."""
    t = (x.double() @ A.double().T).float().bfloat16().double()
    y = t @ B.double().T
    return y if bias is None else y + bias.double()


def ulps_apart(y, ref):
    """Distance in bfloat16 units in the last place of the reference."""
    ref = ref.float().bfloat16()
    ulp = (ref.float().abs() * 2.0 ** -7).clamp_min(2.0 ** -133)
    return ((y.float() - ref.float()).abs() / ulp)


# (M, k, r, d, threads): which edge of the AVX512-BF16 kernels each reaches.
BF16_DOT_SHAPES = [
    (40, 64, 8, 37, 2),        # few rows: threads split outputs; a 5-output panel tail
    (200, 100, 17, 50, 2),     # row blocks; odd rank (last pair half empty); k tail of 4
    (13, 4096, 64, 4096, 1),   # one thread: a 12-row tile + 1, two k chunks
    (9, 2049, 3, 16, 2),       # k chunk tail of 1, r below one tile, one half panel
    (8, 31, 1, 33, 1),         # the first row count on the path; k below one vector
    (100, 64, 66, 70, 2),      # B packed once per call: 33 pairs (16 + 16 + 1), a 6-output tail
    # A packed into pairs once per call (r ≥ 32, ≥ 192 rows per thread), blocks of whole 12-row units:
    (390, 301, 37, 70, 2),     # odd k (last pair half empty), 3-vector tiles of 8 rows, 5-rank tail
    (197, 64, 130, 33, 1),     # one thread; rank groups 64 + 64 + 2 (a 1-vector group, 12-row tiles)
    (500, 40, 96, 129, 2),     # groups 64 + 32; 20 pairs (a 16-pair block and a 4-pair one)
    (385, 1, 48, 5, 2),        # k = 1: a single half pair; a last block of 1 row
    (1600, 77, 40, 50, 8),     # eight threads: 200 rows each, blocks of 12-row units
]


@pytest.mark.parametrize("M,k,r,d,nthreads", BF16_DOT_SHAPES)
def test_avx512bf16_kernels_match_their_rounding_model(threads, M, k, r, d, nthreads):
    # The bf16 tolerance of the other tests is loose; here every output must
    # be within 2 bfloat16 ulps of the exact model of this path, and nearly
    # all equal to it (float32 sums may round a tie the other way).
    if torch.ops.lowrank_ext._cpu_kernel("") != "avx512bf16":
        pytest.skip("this CPU (or the kernel switch) does not run AVX512-BF16")
    threads(nthreads)
    x, A, B, bias = make(M, k, r, d, torch.bfloat16)
    y, t = torch.ops.lowrank_ext.lowrank_linear_with_intermediate(x, A, B, bias)
    assert ulps_apart(t, x.double() @ A.double().T).max() <= 1, "shrink off by more than 1 ulp"
    gap = ulps_apart(y, bf16_intermediate_reference(x, A, B, bias))
    assert gap.max() <= 2, f"expand off by {gap.max():.1f} ulps"
    assert (gap > 0).float().mean() < 0.05
    y_alone = lowrank_ext.lowrank_linear(x, A, B, bias)
    assert torch.equal(y_alone, y), "keeping the intermediate changed the output"


@pytest.mark.parametrize("M", [24, 400])  # the expand's tiles; with the packed shrink as well
def test_avx512bf16_nan_output_is_c10s_and_spares_the_other_outputs(threads, M):
    # The expand rounds a tile by hardware conversion, which keeps a NaN's
    # sign and payload, unless the tile holds a NaN: then the whole tile takes
    # the exact rounding. A NaN output must be c10's one quiet NaN, and every
    # other output as without the NaN.
    if torch.ops.lowrank_ext._cpu_kernel("") != "avx512bf16":
        pytest.skip("this CPU (or the kernel switch) does not run AVX512-BF16")
    threads(2)
    x, A, B, bias = make(M, 64, 40, 70, torch.bfloat16)
    clean = lowrank_ext.lowrank_linear(x, A, B, bias)
    B.view(torch.int16)[7, 3] = 0xFFC1 - 0x10000  # a negative NaN with a payload: output 7
    y = lowrank_ext.lowrank_linear(x, A, B, bias)
    assert (y[:, 7].view(torch.int16) == 0x7FC0).all(), "NaN outputs are not c10's quiet NaN"
    others = torch.arange(70) != 7
    assert torch.equal(y[:, others], clean[:, others])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_rounding_matches_torch(kernel, dtype):
    # Outputs round to nearest even like torch's own conversion of the float32
    # sum (of the bfloat16-rounded intermediate on the AVX512-BF16 path).
    x, A, B, bias = make(40, 64, 8, 37, dtype)
    y = lowrank_ext.lowrank_linear(x, A, B, bias)
    model = bf16_intermediate_reference if kernel == "avx512bf16" and dtype == torch.bfloat16 \
        else reference
    exact = model(x, A, B, bias).float().to(dtype)
    mismatch = (y != exact).float().mean().item()
    assert mismatch < 0.05, f"{mismatch:.1%} of outputs differ from the rounded reference"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,k,r,d", [
    (1, 10, 2, 10),       # float32: gx through mm, gA and gB through _weight_grad
    (5, 1030, 9, 33),     # float32: gx through _weight_grad too
    (70, 300, 16, 90),
    (300, 70, 20, 45),
    (1600, 40, 18, 24),   # float32: gx = (gy·B)·A through the forward kernel itself
])
@pytest.mark.parametrize("grad_out", ["dense", "broadcast"])
def test_backward_matches_float64_reference(kernel, dtype, M, k, r, d, grad_out):
    x, A, B, bias = make(M, k, r, d, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, bias)]
    gy = torch.randn(M, d).to(dtype)
    if grad_out == "broadcast":  # the stride-0 gradient that .sum() produces
        gy = torch.ones(1, 1, dtype=dtype).expand(M, d)
    got = torch.autograd.grad(lowrank_ext.lowrank_linear(*leaves), leaves, gy)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B, bias)]
    xr, Ar, Br, br = ref_leaves
    want = torch.autograd.grad(xr @ (Br @ Ar).T + br, ref_leaves, gy.double())
    for g, w in zip(got, want):
        assert_matches(g, w, dtype)


def test_double_backward_keeps_the_differentiable_path():
    # With create_graph the backward must stay on differentiable ATen ops.
    x, A, B, bias = make(4, 6, 3, 5, torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: lowrank_ext.lowrank_linear(x, A, B, bias), (x,))


# (len, m, n, threads): the rows contracted over, and the output's shape.
# The kernel takes columns in blocks of up to 128 (8 panels of 16) and rows
# of b in chunks of 256.
WEIGHT_GRAD_SHAPES = [
    (300, 20, 70, 2),    # a 44-row chunk tail, a 2-row tile tail, a 6-column panel tail
    (256, 6, 16, 1),     # one chunk, one tile, one panel
    (513, 64, 33, 2),    # a 1-row chunk tail, a 1-column panel tail
    (300, 13, 300, 2),   # blocks of 128, 128 and 44 columns (2 panels and 12 columns)
    (40, 9, 4100, 2),    # 33 column blocks, the last one 4 columns: one row block
    (16, 1000, 17, 2),   # one column block: rows split into blocks, a 4-row block tail
    (7, 50, 64, 3),      # one column block for 3 threads: row blocks of 6, a 2-row tail
    (1, 1, 1, 1),
    (0, 3, 5, 1),        # nothing to contract: zeros
]


# a is read in place through its strides: L[i, j] = a[j, i].
A_LAYOUTS = ["contiguous", "transposed", "column_slice", "broadcast_rows"]


@pytest.mark.parametrize("a_layout", A_LAYOUTS)
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "broadcast_rows"])
@pytest.mark.parametrize("len_,m,n,nthreads", WEIGHT_GRAD_SHAPES)
def test_weight_grad_matches_float64(kernel, threads, len_, m, n, nthreads, layout, a_layout):
    threads(nthreads)
    a = torch.randn(len_, m)
    if a_layout == "transposed":  # gt.t() as the backward passes it for gx = gt·A
        a = torch.randn(m, len_).T
    elif a_layout == "column_slice":
        a = torch.randn(len_, m + 3)[:, 1:1 + m]
    elif a_layout == "broadcast_rows":
        a = torch.randn(1, m).expand(len_, m)
    b = torch.randn(len_, n)
    if layout == "column_slice":  # rows of b further apart than n
        b = torch.randn(len_, n + 5)[:, 2:2 + n]
    elif layout == "broadcast_rows":  # stride-0 rows, as a gradient of .sum() gives
        b = torch.randn(1, n).expand(len_, n)
    G = torch.ops.lowrank_ext._weight_grad(a, b)
    want = a.double().T @ b.double()
    assert G.shape == (m, n) and G.dtype == torch.float32
    torch.testing.assert_close(G.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, len_ ** 0.5))


def test_weight_grad_other_dtypes_meta_and_errors():
    a, b = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.lowrank_ext._weight_grad(a, b), a.T @ b)
    meta = torch.ops.lowrank_ext._weight_grad(torch.empty(5, 3, device="meta"),
                                              torch.empty(5, 4, device="meta"))
    assert meta.shape == (3, 4) and meta.device.type == "meta"
    checks = torch.library.opcheck(torch.ops.lowrank_ext._weight_grad.default,
                                   (torch.randn(300, 7), torch.randn(300, 9)))
    assert all(v == "SUCCESS" for v in checks.values()), checks
    for device in ("cpu", "meta"):  # the meta kernel refuses what the CPU kernel refuses
        with pytest.raises(RuntimeError, match="_weight_grad: expected a"):
            torch.ops.lowrank_ext._weight_grad(torch.randn(5, 3, device=device),
                                               torch.randn(6, 4, device=device))
    with pytest.raises(RuntimeError, match="_weight_grad: a is float32 but b is float64"):
        torch.ops.lowrank_ext._weight_grad(torch.randn(5, 3), torch.randn(5, 4).double())


@pytest.fixture
def prefault():
    saved = torch.ops.lowrank_ext._cpu_prefault()
    yield torch.ops.lowrank_ext._cpu_prefault
    torch.ops.lowrank_ext._cpu_prefault(saved)


def test_prefault_switch_reports_and_sets(prefault):
    assert isinstance(prefault(), bool)
    assert prefault(False) is False and prefault() is False
    assert prefault(True) is True and prefault() is True
    assert lowrank_ext.backend_info()["cpu_prefault"] is True


# Outputs of 32 MB (float32) are freshly mapped on every call, so their blocks
# go through the prefault; 16 MB (bfloat16) may be reused heap memory, which
# it skips. The small k and r keep the products cheap.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep", [False, True])
def test_prefaulted_outputs_match_reference_and_unprefaulted(kernel, prefault, dtype, keep):
    M, k, r, d = 2048, 48, 17, 4096
    x, A, B, bias = make(M, k, r, d, dtype)
    op = (torch.ops.lowrank_ext.lowrank_linear_with_intermediate if keep
          else torch.ops.lowrank_ext.lowrank_linear)
    outputs = {}
    for enabled in (True, False):
        prefault(enabled)
        out = op(x, A, B, bias)
        outputs[enabled] = out[0] if keep else out
    assert torch.equal(outputs[True], outputs[False])
    assert_matches(outputs[True], reference(x, A, B, bias), dtype)


# --- lora_linear's dense product at few rows (cpu/few_rows.h) -------------------------
def _few_rows_expected(kernel, dtype, M, slow_from, fast):
    """Whether a few-row stream over W should run here: from ``slow_from`` to 63
    rows in a half type whose ATen GEMM is slow on this CPU, otherwise within
    ``fast[dtype] = (first, last)`` rows."""
    from reference import bfloat16_gemm_is_slow, float16_gemm_is_slow

    if kernel == "portable":
        return False
    slow = {torch.float16: float16_gemm_is_slow(),
            torch.bfloat16: bfloat16_gemm_is_slow()}.get(dtype, False)
    if slow:
        return slow_from <= M < 64
    first, last = fast.get(dtype, (1, 0))
    return first <= M <= last


def _few_rows_stream_expected(kernel, dtype, M):
    """Whether lora_linear's dense x·Wᵀ should run on the shrink kernels here."""
    return _few_rows_expected(kernel, dtype, M, 2,
                              {torch.float32: (1, 128), torch.bfloat16: (1, 32)})


def _run_counting_dense_products(fn, d, k):
    """fn()'s result and the ATen matrix products it ran on a (d, k) or (k, d) operand."""
    from reference import PRODUCTS

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        out = fn()
    hits = [e.name for e in prof.events() if e.name in PRODUCTS + ("aten::addmm_",)
            and any(list(s) in ([d, k], [k, d]) for s in e.input_shapes)]
    return out, hits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 2, 4, 5, 9, 32, 33, 63, 64, 128, 129])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lora_few_rows_dense_product(kernel, dtype, M, bias):
    from reference import lora_reference

    # d = 150: the stream takes W's rows 32 at a time, with a tail.
    k, r, d = 67, 5, 150
    x, A, B, b = make(M, k, r, d, dtype, bias)
    W = (torch.randn(d, k) * k ** -0.5).to(dtype)
    (y, t), hits = _run_counting_dense_products(
        lambda: torch.ops.lowrank_ext.lora_linear_with_intermediate(x, W, A, B, b, 0.7), d, k)
    assert (not hits) == _few_rows_stream_expected(kernel, dtype, M), hits
    assert_matches(y, lora_reference(x, W, A, B, b, 0.7), dtype)
    assert_matches(t, x.double() @ A.double().T, dtype)
    torch.testing.assert_close(lowrank_ext.lora_linear(x, W, A, B, b, 0.7), y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_few_rows_layouts_rank_zero_and_gradients(dtype):
    from reference import lora_reference

    k, r, d, M = 67, 5, 45, 3 if dtype == torch.float32 else 2
    x, A, B, b = make(M, k, r, d, dtype)
    W = (torch.randn(d, k) * k ** -0.5).to(dtype)
    ref = lora_reference(x, W, A, B, b, 0.7)
    # x with a column stride of 2 still streams; a transposed W goes to ATen.
    wide = torch.zeros(M, 2 * k, dtype=dtype)
    wide[:, ::2] = x
    y, hits = _run_counting_dense_products(
        lambda: lowrank_ext.lora_linear(wide[:, ::2], W, A, B, b, 0.7), d, k)
    active = torch.ops.lowrank_ext._cpu_kernel("")
    assert (not hits) == _few_rows_stream_expected(active, dtype, M), hits
    assert_matches(y, ref, dtype)
    W_t = W.t().contiguous().t()
    y, hits = _run_counting_dense_products(
        lambda: lowrank_ext.lora_linear(x, W_t, A, B, b, 0.7), d, k)
    assert hits
    assert_matches(y, ref, dtype)
    # r = 0: the adapter adds nothing; k = 0: both sums are empty.
    y = lowrank_ext.lora_linear(x, W, A[:0], B[:, :0], b, 0.7)
    assert_matches(y, lora_reference(x, W, A[:0], B[:, :0], b, 0.7), dtype)
    y = lowrank_ext.lora_linear(x[:, :0], W[:, :0], A[:, :0], B, b, 0.7)
    assert_matches(y, b.double().expand(M, d), dtype)
    # Gradients (the intermediate saved for gB comes from this path).
    leaves = [v.clone().requires_grad_() for v in (x, W, A, B, b)]
    lowrank_ext.lora_linear(*leaves, scale=0.7).square().sum().backward()
    ref_leaves = [v.double().requires_grad_() for v in (x, W, A, B, b)]
    lora_reference(*ref_leaves, scale=0.7).square().sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert_matches(got.grad, want.grad, dtype)


def _few_rows_backward_expected(kernel, dtype, M):
    """Whether lora_linear's backward gx = gy·W should stream W here."""
    return _few_rows_expected(kernel, dtype, M, 1,
                              {torch.float32: (2, 16), torch.bfloat16: (1, 1)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 16, 17, 63])
def test_lora_few_rows_backward(kernel, dtype, M):
    from reference import lora_reference

    k, r, d = 67, 5, 45  # k and d not multiples of 8: the column tail runs too
    x, A, B, b = make(M, k, r, d, dtype)
    W = (torch.randn(d, k) * k ** -0.5).to(dtype)
    gy = torch.randn(M, d).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, A, B)]
    y = lowrank_ext.lora_linear(leaves[0], W, leaves[1], leaves[2], b, 0.7)
    grads, hits = _run_counting_dense_products(
        lambda: torch.autograd.grad(y, leaves, gy), d, k)
    assert (not hits) == _few_rows_backward_expected(kernel, dtype, M), hits
    ref_leaves = [v.double().requires_grad_() for v in (x, A, B)]
    ref = lora_reference(ref_leaves[0], W, ref_leaves[1], ref_leaves[2], b, 0.7)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gy.double())
    for got, want in zip(grads, ref_grads):
        assert_matches(got, want, dtype)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M, d, n", [
    (1, 70, 45), (3, 9, 17),                # the streaming form (below 4 rows)
    (4, 64, 16), (5, 65, 33), (7, 1, 530),  # panels: a block of W's rows, tails
    (13, 130, 1100), (40, 200, 15),          # several row tiles, column chunks
])
def test_rows_times_weight_kernel(kernel, w_dtype, M, d, n):
    """The _rows_times_weight op (lora_linear's gx = gy·W) against float64: both
    kernel forms, tails in rows (tiles of 6), W rows (blocks of 64) and columns
    (groups of 16, chunks of 512), a strided g, and every kernel set."""
    g = torch.randn(M, 2 * d)[:, ::2]  # rows 2d apart, column stride 2
    W = torch.randn(d, n).to(w_dtype)
    out = torch.ops.lowrank_ext._rows_times_weight(g, W)
    want = g.double() @ W.double()
    assert out.dtype == torch.float32 and out.shape == (M, n)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * d ** 0.5)
    # Computed twice on a dirty allocator: no output element is left unwritten.
    torch.testing.assert_close(torch.ops.lowrank_ext._rows_times_weight(g, W), out,
                               rtol=0, atol=0)


def test_lora_few_rows_backward_layouts_and_double_backward():
    from reference import lora_reference

    k, r, d, M = 67, 5, 45, 4
    x, A, B, b = make(M, k, r, d, torch.float32)
    W = torch.randn(d, k) * k ** -0.5
    gy = torch.randn(M, d)
    ref_x = x.double().requires_grad_()
    want = torch.autograd.grad(lora_reference(ref_x, W, A, B, b, 0.7), ref_x, gy.double())[0]
    # A transposed W is read by ATen; double backward keeps the differentiable path.
    for W_used, create_graph in ((W.t().contiguous().t(), False), (W, True)):
        xl = x.clone().requires_grad_()
        y = lowrank_ext.lora_linear(xl, W_used, A, B, b, 0.7)
        (gx,), hits = _run_counting_dense_products(
            lambda: torch.autograd.grad(y, (xl,), gy, create_graph=create_graph), d, k)
        assert hits
        assert_matches(gx, want, torch.float32)


# --- lora_linear in a half type from a GEMM's worth of rows: the adapter term
# c = bias + scale·(x·Aᵀ)·Bᵀ, formed in float32, goes to the half type's GEMM
# as its C, rounded, and what that rounding dropped is added after it
# (split_scaled_adapter_cpu: AVX2, and AVX-512 for bfloat16).

def _cancelling_lora(M, k, r, d, dtype, seed=0):
    """Inputs whose dense product and adapter cancel to a few percent of
    either, so that rounding the adapter to the half type alone is off by many
    units in the last place of the result. Every value is a small multiple of
    a power of two (x integers, A eighths, B quarters, W multiples of 2^-6,
    the bias multiples of 2^-10), so every float32 sum is exact: what remains
    is the rounding to the half type alone."""
    g = torch.Generator().manual_seed(seed)

    def ints(*shape, low=-8, high=9):
        return torch.randint(low, high, shape, generator=g, dtype=torch.int64).double()

    x, A, B = ints(M, k), ints(r, k) / 8, ints(d, r) / 4
    scale = 0.5
    W = -scale * B @ A + ints(d, k, low=-1, high=2) / 64
    bias = ints(d, low=-100, high=100) / 1024
    return (*(v.to(dtype) for v in (x, W, A, B, bias)), scale)


# (M, k, r, d): rows past one 64-row tile and past one block of the caller's
# row loop (2^18 / d rows), outputs past one 256-column tile with tails of 16
# and 8 lanes, fewer outputs than one vector, odd ranks.
HALF_LORA_SHAPES = [(33, 40, 3, 9), (70, 64, 5, 300), (130, 24, 16, 4100), (65, 8, 1, 263)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,k,r,d", HALF_LORA_SHAPES)
def test_half_lora_adapter_split_keeps_a_cancelling_result(monkeypatch, kernel, dtype, M, k, r, d):
    from reference import lora_reference

    # float16's GEMM is slow on most CPUs, where lora_linear widens it to
    # float32: held to the half type's GEMM here.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", "0")
    x, W, A, B, bias, scale = _cancelling_lora(M, k, r, d, dtype)
    eps = torch.finfo(dtype).eps
    for b in (bias, None):
        ref = lora_reference(x, W, A, B, b, scale)
        c = scale * (x.double() @ A.double().T) @ B.double().T + (0 if b is None else b.double())
        y = lowrank_ext.lora_linear(x, W, A, B, b, scale)
        assert y.dtype == dtype and y.shape == (M, d)
        # The GEMM rounds the result plus the remainder, which is within half
        # a unit of c's last place, and the remainder is rounded: a bound of
        # eps·|result| twice plus eps²·|c|. Rounding c alone (no remainder)
        # is off by up to eps/2·|c|, 2^7 (bfloat16) or 2^10 (float16) times
        # that, and more than ten times it here.
        bound = 2 * eps * ref.abs() + eps ** 2 * c.abs()
        assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()
        # Computed twice on a dirty allocator: every element is written.
        torch.testing.assert_close(lowrank_ext.lora_linear(x, W, A, B, b, scale), y,
                                   rtol=0, atol=0)


def _special_lora(M, k, r, d):
    """bfloat16 inputs with a NaN and an infinity in the adapter's weights, an
    infinite bias, an adapter past bfloat16's range for one output and one
    whose rounding remainder is subnormal."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, k, generator=g).bfloat16()
    W = (torch.randn(d, k, generator=g) * k ** -0.5).bfloat16()
    A = (torch.randn(r, k, generator=g) * k ** -0.5).bfloat16()
    B = torch.randn(d, r, generator=g).bfloat16()
    bias = torch.randn(d, generator=g).bfloat16()
    B[3, 0] = float("nan")
    B[5, 1] = float("inf")
    bias[7] = float("-inf")
    B[9] = 3e38               # scale·t·Bᵀ beyond bfloat16's largest value
    B[11] = 1e-36             # c ≈ 1e-36: a subnormal remainder
    W[11] = 0
    bias[11] = 0
    return x, W, A, B, bias


@pytest.mark.parametrize("M,d", [(40, 300), (100, 37)])
def test_half_lora_adapter_split_vector_widths_agree_bit_for_bit(M, d):
    """The AVX-512 split (kernel set "auto" on an AVX512-BF16 CPU) and the AVX2
    one round the same float32 sums, so they agree to the bit, NaN and
    infinities included, and both match the float64 reference elsewhere."""
    from reference import lora_reference

    from lowrank_ext import _fallback

    previous = torch.ops.lowrank_ext._cpu_kernel("")
    k, r = 48, 4
    x, W, A, B, bias = _special_lora(M, k, r, d)
    try:
        outs = {}
        for choice in ("auto", "avx2"):
            torch.ops.lowrank_ext._cpu_kernel(choice)
            outs[choice] = lowrank_ext.lora_linear(x, W, A, B, bias, 2.0)
    finally:
        torch.ops.lowrank_ext._cpu_kernel(CHOICE_FOR[previous])
    torch.testing.assert_close(outs["auto"], outs["avx2"], rtol=0, atol=0, equal_nan=True)
    want = _fallback.lora_linear(x, W, A, B, bias, 2.0)
    y = outs["auto"]
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y.isinf(), want.isinf()) and torch.equal(y[y.isinf()], want[want.isinf()])
    finite = want.isfinite()
    ref = lora_reference(x, W, A, B, bias, 2.0)
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=2 ** -7, atol=1e-3)
    # The output whose adapter is about 1e-36: its digits survive the split.
    torch.testing.assert_close(y[:, 11].double(), ref[:, 11], rtol=2 ** -7, atol=0)
