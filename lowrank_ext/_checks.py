"""Input validation for the pure-torch kernels and the fake (meta) kernels.

Each message matches csrc/checks.cpp word for word, so both backends raise the
same exception type with the same text; tests compare them.
"""

import math
import numbers

import torch

from ._names import first_line

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_int(value):
    """An integer of any kind (numpy's too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def holds_values(t):
    """False for a meta or fake tensor: shapes only, no values a check could read."""
    if t.is_meta:
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # a torch without fake tensors
        return True
    return not is_fake(t)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def shape_str(t):
    return str(list(t.shape))


def check_is_tensor(op, **tensors):
    """TypeError for an argument that is not a tensor (None allowed for bias)."""
    for name, value in tensors.items():
        if value is None and name == "bias":
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def check_not_nested(op, **tensors):
    """TypeError for a nested tensor (the dispatcher's own error names no argument)."""
    for name, value in tensors.items():
        if value is not None and value.is_nested:
            raise TypeError(
                f"{op}: {name} is a nested tensor, which the op does not take; apply it to "
                f"each tensor of {name}.unbind() (LowRankLinear and LoRALinear do that for a "
                "nested x)")


def _check_dtype_device(op, name, t, ref, ref_name):
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {dtype_name(t.dtype)} but {ref_name} has dtype "
            f"{dtype_name(ref.dtype)}; all tensors must share one dtype")
    if t.device != ref.device:
        raise RuntimeError(
            f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
            "all tensors must be on one device")


_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


def _check_tensor(op, name, t, dense):
    """As check_tensor in csrc/checks.cpp: a tensor (None only for the bias,
    checked by the caller), strided where ``dense``, else strided or sparse
    COO, CSR or CSC (the block layouts have products on one side only)."""
    check_is_tensor(op, **{name: t})
    if t.layout != torch.strided and (dense or t.layout not in _SPARSE_LAYOUTS):
        kind = "dense (strided)" if dense else "strided or sparse COO, CSR or CSC"
        block = t.layout in (torch.sparse_bsr, torch.sparse_bsc)
        raise TypeError(f"{op}: {name} must be a {kind} tensor, got layout "
                        f"{str(t.layout).removeprefix('torch.')}"
                        + ("; convert it with .to_sparse() (COO)" if not dense and block else ""))
    if t.layout != torch.strided and t.dense_dim() != 0:
        # A hybrid sparse tensor (dense dimensions below its sparse ones, as
        # to_sparse(1) makes) is no matrix of numbers to the products.
        raise ValueError(f"{op}: {name} must be a sparse matrix of numbers, got a hybrid "
                         f"sparse tensor with {t.sparse_dim()} sparse and {t.dense_dim()} "
                         "dense dimension(s)")


def _check_x(op, x):
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., k), got a 0-D tensor")
    if x.layout != torch.strided and x.dim() != 2:
        # Sparse tensors have no reshape to (M, k) rows: the products take a matrix.
        raise ValueError(f"{op}: a sparse x must be 2-D (M, k), got shape {shape_str(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: x must be float32, float64, float16 or bfloat16, got {dtype_name(x.dtype)}")


def _check_factors(op, x, A, B):
    if A.dim() != 2:
        raise ValueError(f"{op}: A must be 2-D (r, k), got shape {shape_str(A)}")
    if B.dim() != 2:
        raise ValueError(f"{op}: B must be 2-D (d, r), got shape {shape_str(B)}")
    if A.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: A has shape {shape_str(A)} but x has k={x.shape[-1]} features in its "
            f"last dimension (x shape {shape_str(x)})")
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"{op}: B has shape {shape_str(B)} but A has rank r={A.shape[0]} "
            f"(A shape {shape_str(A)}); B must be (d, r)")


def _check_bias(op, bias, d):
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d):
        raise ValueError(f"{op}: bias must have shape [d] = [{d}], got shape {shape_str(bias)}")


def check_lowrank_linear_inputs(op, x, A, B, bias):
    _check_tensor(op, "x", x, False)
    _check_tensor(op, "A", A, False)
    _check_tensor(op, "B", B, False)
    if bias is not None:
        _check_tensor(op, "bias", bias, True)
    _check_x(op, x)
    _check_dtype_device(op, "A", A, x, "x")
    _check_dtype_device(op, "B", B, x, "x")
    if bias is not None:
        _check_dtype_device(op, "bias", bias, x, "x")
    _check_factors(op, x, A, B)
    _check_bias(op, bias, B.shape[0])


def check_lora_linear_inputs(x, W, A, B, bias, scale):
    op = "lora_linear"
    _check_tensor(op, "x", x, False)
    _check_tensor(op, "W", W, True)
    _check_tensor(op, "A", A, False)
    _check_tensor(op, "B", B, False)
    if bias is not None:
        _check_tensor(op, "bias", bias, True)
    _check_x(op, x)
    _check_dtype_device(op, "W", W, x, "x")
    _check_dtype_device(op, "A", A, x, "x")
    _check_dtype_device(op, "B", B, x, "x")
    if bias is not None:
        _check_dtype_device(op, "bias", bias, x, "x")
    if W.dim() != 2:
        raise ValueError(f"{op}: W must be 2-D (d, k), got shape {shape_str(W)}")
    if W.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: W has shape {shape_str(W)} but x has k={x.shape[-1]} features in its "
            f"last dimension (x shape {shape_str(x)})")
    _check_factors(op, x, A, B)
    if B.shape[0] != W.shape[0]:
        raise ValueError(
            f"{op}: B has shape {shape_str(B)} but W has d={W.shape[0]} output features "
            f"(W shape {shape_str(W)})")
    _check_bias(op, bias, W.shape[0])
    try:
        finite = math.isfinite(scale)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{op}: scale must be finite, got an int beyond float's range") from None
    if not finite:
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def float_scale(owner, scale):
    """A LoRA ``scale`` as a float; a TypeError or ValueError naming ``owner``
    for what is no real number or an int past float's range (finiteness is
    checked where it applies)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{owner}: scale must be a real number, got {type(scale).__name__}")
    try:
        return float(scale)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{owner}: scale must be finite, got an int beyond float's "
                         "range") from None


def check_svd_matrix(W):
    """The checks on W that need no rank (layout, shape, dtype, finiteness)."""
    if W.layout != torch.strided:
        raise TypeError(f"svd_truncate: W must be a dense (strided) tensor, got layout "
                        f"{str(W.layout).removeprefix('torch.')}")
    if W.dim() != 2:
        raise ValueError(f"svd_truncate: W must be 2-D (d, k), got shape {shape_str(W)}")
    if W.numel() == 0:
        raise ValueError(f"svd_truncate: W must not be empty, got shape {shape_str(W)}")
    if W.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            "svd_truncate: W must be float32, float64, float16 or bfloat16, got "
            f"{dtype_name(W.dtype)}")


def check_svd_rank(W, rank):
    max_rank = min(W.shape)
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"svd_truncate: rank must be in [1, {max_rank}] for W of shape {shape_str(W)}, "
            f"got {rank}")


def check_svd_finite(W):
    if not bool(torch.isfinite(W).all()):
        raise ValueError("svd_truncate: W contains NaN or Inf")


def check_rows_times_weight_inputs(g, W):
    """The internal _rows_times_weight op: float32 g (M, d) and a floating W (d, n)."""
    if g.dim() != 2 or W.dim() != 2 or g.shape[1] != W.shape[0]:
        raise RuntimeError(f"_rows_times_weight: expected g (M, d) and W (d, n), got "
                           f"{shape_str(g)} and {shape_str(W)}")
    if g.dtype != torch.float32 or not W.dtype.is_floating_point:
        raise RuntimeError(f"_rows_times_weight: expected float32 g and a floating-point W, "
                           f"got {dtype_name(g.dtype)} and {dtype_name(W.dtype)}")


def check_weight_grad_inputs(a, b):
    """The internal _weight_grad op: a (len, m) and b (len, n) of one dtype."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise RuntimeError(f"_weight_grad: expected a (len, m) and b (len, n), got "
                           f"{shape_str(a)} and {shape_str(b)}")
    if a.dtype != b.dtype:
        raise RuntimeError(f"_weight_grad: a is {dtype_name(a.dtype)} but b is "
                           f"{dtype_name(b.dtype)}")


def check_device(owner, device, why_not_meta):
    """``device`` as a torch.device (None stays None); a TypeError or ValueError
    naming ``owner`` for anything but an available real device."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise TypeError(f"{owner}: device must be a torch.device, str or int, got "
                        f"{type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{owner}: device {device!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{owner}: device {str(device)!r} is not available "
                         "(torch.cuda.is_available() is False)")
    if device.type == "meta":
        raise ValueError(f"{owner}: device 'meta' {why_not_meta}")
    try:  # a backend torch was built without, or a GPU index past the last
        torch.empty(0, device=device)
    except Exception as exc:  # AssertionError, ModuleNotFoundError, RuntimeError, ...
        reason = first_line(exc).split(". ")[0]  # some run to a page
        raise ValueError(f"{owner}: device {str(device)!r} is not available: {reason}") \
            from None
    return device
