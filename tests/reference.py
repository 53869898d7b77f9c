"""Independent float64 references: the dense W = B·A the ops avoid forming."""

import contextlib
import copy

import torch


def lowrank_reference(x, A, B, bias=None):
    W = B.double() @ A.double()
    y = x.double() @ W.T
    return y if bias is None else y + bias.double()


def lora_reference(x, W, A, B, bias=None, scale=1.0):
    W_eff = W.double() + scale * (B.double() @ A.double())
    y = x.double() @ W_eff.T
    return y if bias is None else y + bias.double()


def dense_float64_copy(model):
    """The model in float64 with every LowRankLinear and LoRALinear replaced by
    an nn.Linear holding its dense weight (B·A, or W + scale·B·A unless merged):
    a reference computed without the ops."""
    import lowrank_ext as lx

    model = copy.deepcopy(model).double()
    replaced = set()
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[0] in replaced:
            continue  # the base of a LoRALinear replaced just before
        if isinstance(module, lx.LowRankLinear):
            weight, bias = module.B @ module.A, module.bias
        elif isinstance(module, lx.LoRALinear) and isinstance(
                module.base, (torch.nn.Linear, lx.LowRankLinear)):
            base = module.base
            weight = (base.B @ base.A if isinstance(base, lx.LowRankLinear)
                      else base.weight)
            bias = base.bias
            if not module.merged:
                weight = weight + module.scale * (module.B @ module.A)
            replaced.add(name)
        else:
            continue
        dense = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                dtype=torch.float64)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    return model


def assert_close_to_reference(out, ref, dtype, scale=None):
    """Compare with a float64 reference, tolerances per dtype, relative to the output's size."""
    from conftest import TOLERANCES

    tol = TOLERANCES[dtype]
    if scale is None:
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    assert out.dtype == dtype
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale)


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm",
            "aten::addmv", "aten::mv")


@contextlib.contextmanager
def product_dtypes():
    """The operand dtypes (``"float"``, ``"c10::Half"``, ...) of every matrix
    product ATen runs inside the block, those called from C++ included; the
    yielded list is filled when the block ends."""
    seen = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        yield seen
    events = prof.events()
    if events and not hasattr(events[0], "input_dtypes"):
        # Older torch releases (2.11) keep the dtypes on the kineto events only.
        found = [(e.name(), e.dtypes()) for e in prof.profiler.kineto_results.events()]
    else:
        found = [(e.name, e.input_dtypes) for e in events]
    seen += [dtype for name, dtypes in found if name in PRODUCTS
             for dtype in dtypes if dtype != "Scalar"]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def float16_gemm_is_slow():
    """Whether this CPU lacks AVX512-FP16 (ATen then has no fast float16 GEMM)."""
    flags = _cpu_flags()
    return flags is not None and " avx512_fp16" not in flags


def bfloat16_gemm_is_slow():
    """Whether this CPU lacks AVX512-BF16 (oneDNN then has no fast bfloat16 GEMM)."""
    flags = _cpu_flags()
    return flags is not None and " avx512_bf16" not in flags
