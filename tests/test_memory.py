"""Peak memory of the forward and of compress_model, measured, not inferred from the code.

The forward's measure is the process's peak resident set (VmHWM in
/proc/self/status), reset before each call through /proc/self/clear_refs: it
sees every byte the call touches, whether it comes from torch's allocator,
malloc or the stack, so a dense W formed anywhere on the way would show.

compress_model's is the peak of the bytes held by the tensors it makes
(``LiveBytes``, which sees every op's outputs and when they are let go):
exact, and free of the allocator's caching, on either backend.
"""

import ctypes
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lowrank_ext
from conftest import requires_compiled

MB = 1 << 20


def _can_reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# The resident-set measures, of the compiled kernels.
resident = [requires_compiled,
            pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs")]


def measured_by_resident_set(test):
    for mark in reversed(resident):
        test = mark(test)
    return test


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _release_free_heap():
    """Hand the allocator's free memory back to the OS (glibc's malloc_trim), so
    that an allocation inside fn() cannot hide in pages that are already
    resident; a no-op with another C library."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_bytes(fn):
    """Bytes by which the peak resident set rises above the start during fn()."""
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak resident set := current resident set
    start = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return (peak - start) * 1024


def measure(fn, repeats=3):
    fn()  # warm: first-call allocations (thread pools, code) are not the op's
    return min(peak_bytes(fn) for _ in range(repeats))


def inputs(M, k, r, d, dtype):
    x = torch.randn(M, k).to(dtype)
    A = (torch.randn(r, k) * k ** -0.5).to(dtype)
    B = (torch.randn(d, r) * r ** -0.5).to(dtype)
    return x, A, B, torch.randn(d).to(dtype)


def composition(x, A, B, bias):
    return F.linear(F.linear(x, A), B, bias)


@measured_by_resident_set
@pytest.mark.parametrize("kernel", ["auto", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_peak_not_above_composition(kernel, dtype):
    previous = torch.ops.lowrank_ext._cpu_kernel("")
    torch.ops.lowrank_ext._cpu_kernel(kernel)
    try:
        # y of 64 MB: above glibc's largest mmap threshold (32 MB), so every
        # call maps fresh pages and the resident-set peak sees the output.
        k, r, d = 512, 64, 8192
        M = (64 * MB) // (d * dtype.itemsize)
        args = inputs(M, k, r, d, dtype)
        y_bytes = M * d * args[0].element_size()
        with torch.no_grad():
            ours = measure(lambda: lowrank_ext.lowrank_linear(*args))
            theirs = measure(lambda: composition(*args))
    finally:
        torch.ops.lowrank_ext._cpu_kernel({"avx512bf16": "auto"}.get(previous, previous))
    # Both must write y; the slack covers page granularity of the resident-set
    # measure, far below the 8 MB (bf16) / 16 MB (fp32) that W (d × k) would take.
    assert ours >= 0.9 * y_bytes, "the measure missed the output itself"
    assert ours <= theirs + 1 * MB, f"ours peaks at {ours / MB:.1f} MB, composition {theirs / MB:.1f} MB"


@measured_by_resident_set
@pytest.mark.parametrize("kernel", ["auto", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_dense_weight_is_formed(kernel, dtype):
    # Few rows, wide layer: W (d × k) would be 64 MB (fp32) against a 0.5 MB output.
    previous = torch.ops.lowrank_ext._cpu_kernel("")
    torch.ops.lowrank_ext._cpu_kernel(kernel)
    try:
        M, k, r, d = 32, 4096, 16, 4096
        args = inputs(M, k, r, d, dtype)
        w_bytes = d * k * args[0].element_size()
        with torch.no_grad():
            ours = measure(lambda: lowrank_ext.lowrank_linear(*args))
            dense = measure(lambda: F.linear(args[0], args[2] @ args[1], args[3]))
        # Training keeps x and the (M × r) intermediate, not W, for backward.
        grads = [t.clone().requires_grad_(True) for t in args]
        train = measure(lambda: torch.autograd.grad(
            lowrank_ext.lowrank_linear(*grads).sum(), grads))
    finally:
        torch.ops.lowrank_ext._cpu_kernel({"avx512bf16": "auto"}.get(previous, previous))
    assert dense >= 0.9 * w_bytes, "the measure missed the dense W of the control"
    assert ours < w_bytes / 8, f"forward peaked at {ours / MB:.1f} MB: a dense W?"
    assert train < w_bytes / 4, f"training step peaked at {train / MB:.1f} MB: a dense W?"


@measured_by_resident_set
def test_loading_into_a_meta_model_never_allocates_the_dense_weights(tmp_path):
    """load_compressed into a model built on meta: the peak resident set rises by
    about the factors, far below the dense weights the factors replace."""
    from torch import nn

    import lowrank_ext as lx

    n, layers, rank = 2048, 4, 16
    dense_bytes = layers * n * n * 4  # 64 MB of float32 weights

    def build():
        return nn.Sequential(*[nn.Linear(n, n) for _ in range(layers)])

    compressed = nn.Sequential(*[lx.LowRankLinear(n, n, rank) for _ in range(layers)])
    path = tmp_path / "model.safetensors"
    lx.save_compressed(compressed, path)
    del compressed
    with torch.device("meta"):
        warm, fresh = build(), build()
    lx.load_compressed(warm, path)  # first-call costs (imports, thread pools) are not the load's
    peak = peak_bytes(lambda: lx.load_compressed(fresh, path))
    assert isinstance(fresh[0], lx.LowRankLinear) and not fresh[0].A.is_meta
    assert peak < dense_bytes / 8, f"peak {peak / MB:.1f} MB against {dense_bytes / MB:.0f} MB dense"


# --- compress_model ------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Within the block, the peak of the bytes held by the tensors its ops make.

    Counted per storage (views share one) from an op's output until the last
    tensor seen on it is let go; the storages of ``skip`` (the model's
    weights, the calibration data) are not the call's.
    """

    def __init__(self, skip=()):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in skip}
        self.holders, self.size, self.now, self.peak = {}, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if not size or key in self.skip:
                continue
            if key not in self.holders:
                self.holders[key], self.size[key] = 0, size
                self.now += size
                self.peak = max(self.peak, self.now)
            self.holders[key] += 1
            weakref.finalize(t, self._let_go, key)
        return out

    def _let_go(self, key):
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.now -= self.size.pop(key)


def compress_peak(model, **kwargs):
    """The peak bytes of the tensors ``compress_model(model, **kwargs)`` makes."""
    skip = [*model.parameters(), *(kwargs.get("calibration") or [])]
    with LiveBytes(skip) as live:
        lowrank_ext.compress_model(model, progress=False, **kwargs)
    return live.peak


@pytest.mark.parametrize("kwargs", [dict(rank=64), dict(ratio=0.5, allocation="uniform"),
                                    dict(tol=0.5), dict(rank=64, calibration=True)],
                         ids=["rank", "uniform", "tol", "calibrated"])
def test_compressing_holds_one_layer_of_work_beyond_the_stored_factors(kwargs):
    """Each further layer adds about its bfloat16 factors to the peak (and its Gram, with
    calibration): its float64 factors, and U at its widest, are not held until every layer
    is done (they were: 6x as much)."""
    n, rank = 256, 64
    peaks = {}
    for count in (2, 10):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(n, n, bias=False) for _ in range(count)])
        model = model.to(torch.bfloat16)
        calibration = [torch.randn(512, n).to(torch.bfloat16)] if "calibration" in kwargs \
            else None
        peaks[count] = compress_peak(model, **dict(kwargs, calibration=calibration))
    factors = 2 * n * rank * 2  # one layer's B and A in bfloat16
    # One calibration run gathers every layer's XᵀX (float64) at once.
    gram = n * n * 8 if "calibration" in kwargs else 0
    per_layer = (peaks[10] - peaks[2]) / 8
    assert per_layer <= gram + 1.5 * factors, \
        f"{(per_layer - gram) / factors:.1f}x a layer's factors besides its Gram"


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_wide_layer_s_work_takes_about_its_float64_weight_and_u(calibrated, monkeypatch):
    """Blocks of rows bound the temporaries of the errors and of U: the peak is the
    float64 weight, converted once, U and the factors, not W − B·A, B·A, and W·G besides
    (4x the float64 weight, from 8x the layer's float32 size)."""
    import lowrank_ext.spectra as spectra

    monkeypatch.setattr(spectra, "_BLOCK_BYTES", 1 << 20)
    d, k = 16384, 256
    model = nn.Sequential(nn.Linear(k, d, bias=False))
    # 320 rows: the layer's output in the calibration run (0.6x the float64
    # weight) stays below the bound, and XᵀX still has full rank.
    calibration = [torch.randn(320, k)] if calibrated else None
    peak = compress_peak(model, ratio=0.5, allocation="uniform", calibration=calibration)
    w64 = d * k * 8
    assert peak <= 1.75 * w64, f"{peak / w64:.2f}x the float64 weight"


# --- the fallback's lora_linear backward ----------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fallback_lora_backward_holds_no_more_than_the_composition(scale):
    """The pure-torch backward kept scale·gy (M × d) alive while it formed gx
    out of place, twice the composition's peak where x needs a gradient."""
    from lowrank_ext import _library

    torch.manual_seed(0)
    M, k, r, d = 512, 256, 8, 1024
    x = torch.randn(M, k, requires_grad=True)
    W, gy = torch.randn(d, k) / 16, torch.randn(M, d)
    A = (torch.randn(r, k) / 16).requires_grad_()
    B = torch.randn(d, r).requires_grad_()
    t = (x @ A.T).detach()
    with LiveBytes([x, W, gy, A, B, t]) as ours:
        grads = _library._lora_grads((True, False, True, True, False), gy, x.detach(), W,
                                     A.detach(), B.detach(), t, scale)
    y = F.linear(x, W) + scale * F.linear(F.linear(x, A), B)
    with LiveBytes([x, W, gy, A, B, t]) as theirs:
        expected = torch.autograd.grad(y, (x, A, B), gy)
    for got, want in zip((grads[0], grads[2], grads[3]), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # (Up to the small (M × r) and (d × r) products, held in another order.)
    small = (M * r + d * r) * 4
    assert ours.peak <= theirs.peak + small, (ours.peak / MB, theirs.peak / MB)


# --- LoRALinear.merge ---------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_holds_one_weight_sized_buffer(use_dora):
    """The range check of the merged weight made it out of place beside the
    product and ran torch.isfinite over it whole: 2.75× the weight's bytes."""
    torch.manual_seed(0)
    d = k = 1024
    layer = lowrank_ext.LoRALinear(nn.Linear(k, d, bias=False), 8, use_dora=use_dora)
    with torch.no_grad():
        layer.B.normal_()
    weight = layer.base.weight
    with LiveBytes([weight, layer.A, layer.B] + ([layer.magnitude] if use_dora else [])) as live:
        layer.merge()
    size = d * k * 4
    # (The finiteness check's temporaries take a block of 1 MB at a time.)
    assert live.peak <= 1.5 * size, f"{live.peak / size:.2f}x the weight"
