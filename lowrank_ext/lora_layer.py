"""``LoRALinear``: a frozen ``nn.Linear`` plus a trainable low-rank adapter,
with peft's conventions (scale α/r or α/√r, Kaiming-uniform A, zero B, PiSSA
initialisation, DoRA, merge/unmerge), over the fused ``lora_linear`` op.
"""

from __future__ import annotations

import math
import numbers
import re
import types
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module  # torch's global module hooks

from . import _functorch
from ._amp import autocast_enabled, outside_autocast
from ._checks import SUPPORTED_DTYPES, dtype_name, float_scale, holds_values, is_int
from ._modules import (_run_the_module, dense_weight, is_conv1d, FSDP_MERGE_WHY, fsdp_managed,
                       stacklevel_outside_package, weight_recomputed)
from .ops import (check_lora_linear_tensors, lora_linear, lora_linear_changing_scale,
                  lowrank_linear)
from .svd import svd_truncate
from .nn import (LowRankLinear, all_finite, break_even_rank, check_initialized,
                 check_no_instance_forward, check_plain_linear_forward, check_rank,
                 dense_product, in_buffer, inference_weight_why, per_sequence)


def _normal_tensor(t):
    """``t`` contiguous, copied where it is an inference tensor (made under
    torch.inference_mode()), to be called outside inference mode."""
    return t.clone(memory_format=torch.contiguous_format) if t.is_inference() else t.contiguous()


def _replace_factors(layer, A, B):
    """Give a LowRankLinear new factors (of a new rank), keeping their requires_grad flags."""
    layer.A = nn.Parameter(A.contiguous(), requires_grad=layer.A.requires_grad)
    layer.B = nn.Parameter(B.contiguous(), requires_grad=layer.B.requires_grad)


def _restore_factors(layer, A, B, originals):
    """Give a LowRankLinear its factors ``A``, ``B`` back (unmerge): in
    ``originals``, the Parameters merge() took out, where they are known, so
    that an optimizer holding them still reaches the model; their values are
    set only where they differ (a state loaded or a move made while merged).
    A Parameter that cannot take the value in place (one left on the meta
    device by a layer built there and materialized while merged) is replaced,
    as where none is known. The new values are made outside inference mode,
    so that the factors stay trainable after an unmerge() under
    torch.inference_mode()."""
    if originals is None:
        originals = (None, None)
    restored = []
    with torch.inference_mode(False):
        for param, value, current in zip(originals, (A, B), (layer.A, layer.B)):
            value = value.detach()
            if param is None or not torch._has_compatible_shallow_copy_type(param, value):
                restored.append(nn.Parameter(value.clone(memory_format=torch.contiguous_format),
                                             requires_grad=current.requires_grad))
                continue
            same = (param.shape == value.shape and param.dtype == value.dtype
                    and param.device == value.device and holds_values(param)
                    and holds_values(value) and bool(torch.equal(param, value)))
            if not same:
                param.data = value.clone(memory_format=torch.contiguous_format)
            param.requires_grad_(current.requires_grad)
            restored.append(param)
    layer.A, layer.B = restored


def _full_rank_factors(B, A):
    """Factors (d × m, m × k) of the product B·A at rank m = min(d, k), for
    B (d × n) and A (n × k) with n > m: a QR of the factor on the shorter side
    folds the other into it (in float32 at least)."""
    work = torch.promote_types(A.dtype, torch.float32)
    d, k = B.shape[0], A.shape[1]
    with outside_autocast(B.device.type):
        if d <= k:
            Q, R = torch.linalg.qr(B.to(work))        # B = Q·R, Q (d × d)
            new_B, new_A = Q, R @ A.to(work)
        else:
            Q, R = torch.linalg.qr(A.to(work).T)      # Aᵀ = Q·R, Q (k × k)
            new_B, new_A = B.to(work) @ R.T, Q.T
    return new_B.to(B.dtype), new_A.to(A.dtype)


# What merge() keeps for unmerge() that the merged weights no longer give: a
# DoRA layer's unmerged row norms, and a LowRankLinear base's own factors where
# the merged ones were folded to rank min(d, k). Buffers, while merged only.
_KEPT_FOR_UNMERGE = ("_dora_norms", "_base_A", "_base_B")

# peft's name for PiSSA on a randomized SVD with n subspace iterations.
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def check_lora_options(owner, rank, alpha, init, dropout, rslora, use_dora=False):
    """Validate LoRA's options other than the rank's range; return alpha (rank when None)."""
    if not isinstance(use_dora, bool):
        raise TypeError(f"{owner}: use_dora must be a bool, got {type(use_dora).__name__}")
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{owner}: alpha must be a real number, got {type(alpha).__name__}")
    try:
        finite = math.isfinite(alpha)
    except OverflowError:  # an int (or Fraction) past float's range
        what = "an int" if isinstance(alpha, numbers.Integral) else f"a {type(alpha).__name__}"
        raise ValueError(f"{owner}: alpha must be finite and > 0, got {what} beyond float's "
                         "range") from None
    if not (finite and alpha > 0):
        raise ValueError(f"{owner}: alpha must be finite and > 0, got {alpha}")
    if not isinstance(init, str) or not (init in ("default", "gaussian", "pissa")
                                         or _PISSA_NITER.fullmatch(init)):
        raise ValueError(f"{owner}: init must be 'default', 'gaussian', 'pissa' or "
                         f"'pissa_niter_<n>', got {init!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"{owner}: dropout must be a real number, got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
    if not isinstance(rslora, bool):
        raise TypeError(f"{owner}: rslora must be a bool, got {type(rslora).__name__}")
    return alpha


_SHARED_ELEMENTS_WHY = ("its elements may share memory (an expanded or overlapping view), "
                        "so it cannot be written in place; give the layer a weight of its "
                        "own (weight.contiguous())")


def _elements_share_memory(t):
    """Whether several elements of ``t`` may be one memory location (a stride
    of 0, as expand() makes, or strides that overlap, as as_strided can):
    an in-place write of different values into it would be wrong. Taken
    from the largest stride down, each must exceed the span of the
    dimensions below it; where it does not, the view may overlap."""
    if t.numel() == 0:
        return False
    span = 0
    dims = sorted(((abs(stride), size) for size, stride in zip(t.shape, t.stride())
                   if size > 1))
    for stride, size in dims:
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def check_lora_init_fits_base(owner, init, base, name=None, use_dora=False):
    """PiSSA splits a dense weight and DoRA rescales its rows: refuse them on a
    LowRankLinear base, naming the layer."""
    where = f" {name}" if name else ""
    if not isinstance(base, LowRankLinear):
        why = weight_recomputed(base) if init.startswith("pissa") else None
        if why:
            raise ValueError(f"{owner}: init={init!r} puts the residual into the base "
                             f"layer{where}'s weight, but {why}")
        weight = dense_weight(base)
        if init.startswith("pissa") and _elements_share_memory(weight):
            raise ValueError(f"{owner}: init={init!r} puts the residual into the base "
                             f"layer{where}'s weight, but {_SHARED_ELEMENTS_WHY}")
        if (init.startswith("pissa") and weight.is_inference()
                and not torch.is_inference_mode_enabled()):
            # torch's copy_ writes before it raises: the weight would be left
            # holding the residual with no adapter beside it.
            raise RuntimeError(
                f"{owner}: init={init!r} puts the residual into the base layer{where}'s "
                "weight, an inference tensor (made under torch.inference_mode()), which can "
                "only be written inside inference mode; build the model outside "
                "inference mode, or add the adapters inside it")
        return
    if init.startswith("pissa"):
        raise ValueError(f"{owner}: init={init!r} splits a dense weight, but the base "
                         f"layer{where} is a LowRankLinear (rank {base.rank}); use "
                         f"init='default' or 'gaussian' there, or train its factors directly")
    if use_dora:
        raise ValueError(f"{owner}: use_dora=True needs a dense weight, but the base "
                         f"layer{where} is a LowRankLinear (rank {base.rank})")


# Rows of W taken at a time for their norms: a block read twice (its norms,
# its product with Aᵀ) is read from memory once, and a half-precision block is
# widened to float32 a few MB at a time.
_NORM_BLOCK_BYTES = 1 << 22
# The expanded square of a row (below) is rounded to about eps times its
# terms' size, ‖W_i‖² + scale²·|B_i|·|A·Aᵀ|·|B_i|ᵀ (the second, not
# scale²·‖(B·A)_i‖²: B_i·(A·Aᵀ)·B_iᵀ can cancel within itself, where A is
# ill-conditioned and B_i points along its weak directions; and not the
# looser (Σ_l |B_il|·‖A_l‖)², which grows with the rank and flagged most
# rows of an ordinary rank-256 adapter); where that is
# more than this many times the result (the adapter cancels most of the row),
# the row's norm is taken from the row of the sum itself: then at most about
# 32·eps off.
_CANCELLATION_LIMIT = 64


def dora_row_norms(weight: Tensor, B: Tensor, A: Tensor, scale: float) -> Tensor:
    """‖W_i + scale·(B·A)_i‖ for every output row i (DoRA's weight norm), detached.

    Neither the d × k sum nor the d × k product B·A is ever formed whole. In
    eager mode on the CPU the square is expanded, ‖W_i‖² +
    2·scale·(W·Aᵀ)_i·B_i + scale²·B_i·(A·Aᵀ)·B_iᵀ: one pass over W, a block of
    rows at a time, for its row norms and its product W·Aᵀ (d × r), about
    twice as fast as forming the sum there (12 against 24 ms at 4096 × 4096). That cancels where the adapter takes away
    most of a row (a relative error of eps·‖W_i‖²/‖W_i + scale·(B·A)_i‖², 0.1
    in float32 for a row 99.9 % cancelled), so those rows are recomputed from
    their rows of the sum (see _CANCELLATION_LIMIT), as peft forms them.
    Elsewhere (under torch.compile, a torch.func transform or
    torch.jit.trace, which cannot pick rows by their number: a trace would
    replay the count of the rows it was traced with, and on devices, where
    counting them would wait for the device) the sum is formed a block of
    rows at a time. In
    float32 (float64 for float64 weights), also inside an autocast region,
    which would run the products in its half type. Returned in ``weight``'s
    dtype.
    """
    device = weight.device.type
    if autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return dora_row_norms(weight, B, A, scale)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = weight.detach()
    A, B = A.detach().to(acc), B.detach().to(acc)
    d, k = weight.shape
    rows = max(1, _NORM_BLOCK_BYTES // (4 * max(k, 1)))
    if not (weight.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and _functorch.transforms_active() is None):
        return torch.cat([_formed_row_norms(weight[i:i + rows], B[i:i + rows], A, scale, acc)
                          for i in range(0, d, rows)]).to(weight.dtype)
    # ‖(B·A)_i‖² through the r × r Gram matrix of A's rows.
    gram = A @ A.T
    squares_ba = ((B @ gram) * B).sum(dim=1)
    squares_w, cross = [], []
    for i in range(0, d, rows):
        block = weight[i:i + rows].to(acc)
        squares_w.append(torch.linalg.vector_norm(block, dim=1).square())
        cross.append((torch.nn.functional.linear(block, A) * B[i:i + rows]).sum(dim=1))
    squares_w = torch.cat(squares_w)
    squares = squares_w + (scale * scale) * squares_ba + (2 * scale) * torch.cat(cross)
    # Rounding may leave a tiny negative where the row cancels out.
    norms = squares.clamp_min(0).sqrt()
    # The rounding's size, first by the cheap bound (Σ_l |B_il|·‖A_l‖)² (d·r),
    # then, for the rows that one cannot clear, by |B_i|·|A·Aᵀ|·|B_i|ᵀ (r² per row).
    s2 = scale * scale
    loose = squares_w + s2 * (B.abs() @ torch.linalg.vector_norm(A, dim=1)).square()
    unsure = (loose > _CANCELLATION_LIMIT * squares).nonzero().squeeze(1)
    B_abs = B[unsure].abs()
    rounding = squares_w[unsure] + s2 * ((B_abs @ gram.abs()) * B_abs).sum(dim=1)
    cancelled = unsure[rounding > _CANCELLATION_LIMIT * squares[unsure]]
    for i in range(0, cancelled.numel(), rows):
        at = cancelled[i:i + rows]
        norms[at] = _formed_row_norms(weight[at], B[at], A, scale, acc)
    return norms.to(weight.dtype)


def _formed_row_norms(weight_rows, B_rows, A, scale, acc):
    """‖W_i + scale·(B·A)_i‖ of the given rows, from those rows of the sum."""
    if torch.compiler.is_compiling():
        # addmm's alpha is a float argument, which torch.compile specializes:
        # a scale that changes would compile a graph per value (see
        # ops.lora_linear_changing_scale). A product scaled after it, in
        # float32 at least, costs no accuracy and next to no time. (Scaling
        # the rows of B first instead, at a scale of 1, made inductor's
        # partitioner fail under activation checkpointing: "Node ... was
        # invalid, but is output".)
        return torch.linalg.vector_norm(weight_rows.to(acc) + scale * (B_rows @ A), dim=1)
    return torch.linalg.vector_norm(
        torch.addmm(weight_rows.to(acc), B_rows, A, alpha=scale), dim=1)


def _state_keys(module, name):
    """The state's keys of ``module``'s tensor ``name``: under a parametrization
    torch stores the original it computes it from (``parametrizations.A.original``,
    or ``original0``, ``original1``, ... where right_inverse gives several)."""
    if not torch.nn.utils.parametrize.is_parametrized(module, name):
        return [name]
    return [f"parametrizations.{name}.{original}"
            for original in module.parametrizations[name]._parameters]


def _dora_factor(magnitude, norms):
    """magnitude / norm per row; a zero row (which contributes zero whatever its
    factor) divides by 1, not 0 (where peft's 0/0 gives NaN)."""
    return magnitude / torch.where(norms > 0, norms, torch.ones_like(norms))


def _runs_hooks(layer):
    """Whether calling ``layer`` does more than its forward: hooks of its own or
    torch's global module hooks (the test nn.Module.__call__ makes), or a
    forward set on the instance (accelerate's hooks replace it so)."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks or not _runs_own_forward(layer)
                or _torch_module._global_forward_hooks
                or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks
                or _torch_module._global_backward_pre_hooks)


def _plus_scaled(y, adapter, scale):
    """``y + scale·adapter``, in one pass of torch.add. Its ``alpha`` is a float
    argument, which torch.compile specializes: a scale that changes would
    compile a graph per value (see ops.lora_linear_changing_scale). There the
    scale is multiplied in instead, which inductor fuses into the same pass."""
    if torch.compiler.is_compiling():
        return y + scale * adapter
    return torch.add(y, adapter, alpha=scale)


def _runs_own_forward(layer):
    """Whether ``layer.forward`` is its class's forward, bound to ``layer``.

    Asked of the bound method rather than of ``"forward" in layer.__dict__``:
    torch.compile guards what is read here, so a forward set on the instance
    after compiling (accelerate's hooks) is seen there too, where the dict
    test was answered once and kept. (A forward set back to the layer's own,
    as accelerate's remove_hook_from_module does, counts as its own.)"""
    forward = layer.forward
    # (isinstance first: torch.compile answers ``getattr(forward, "__func__",
    # None) is type(layer).forward`` wrongly, False, for the layer's own.)
    return (isinstance(forward, types.MethodType) and forward.__func__ is type(layer).forward
            and forward.__self__ is layer)


def _draw_adapter_A(A, init, rank):
    """A drawn as ``init`` ("default" or "gaussian") has it, in place (B starts at zero)."""
    if init == "default":
        # peft's default: Kaiming-uniform A (a=√5, as nn.Linear), zero B.
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    else:  # peft's "gaussian"
        nn.init.normal_(A, std=1.0 / rank)


# torch.fx.symbolic_trace records the norms as one call (they are constants to
# autograd, and their blocks of rows are picked by looking at the values).
torch.fx.wrap("dora_row_norms")


def dora_forward(x: Tensor, weight: Tensor, A: Tensor, B: Tensor, bias: Tensor | None,
                 magnitude: Tensor, scale: float, *, scale_changes: bool = False) -> Tensor:
    """DoRA's output without dropout: ``magnitude / ‖W + scale·B·A‖ ⊙ (x·Wᵀ +
    scale·(x·Aᵀ)·Bᵀ) + bias``, the norm held constant in the backward; one
    ``lora_linear`` call plus the norm, a block of rows at a time. A row whose
    ``W + scale·B·A`` is zero gets its bias (not 0/0). ``scale_changes``: the
    scale changes between calls (see ops.lora_linear_changing_scale)."""
    factor = _dora_factor(magnitude, dora_row_norms(weight, B, A, scale))
    fused = lora_linear_changing_scale if scale_changes else lora_linear
    product = fused(x, weight, A, B, None, scale)
    out = factor * product
    # The products' dtype, which autocast may have lowered below the factor's
    # (peft casts back the same way).
    return (out if bias is None else out + bias).to(product.dtype)


def _checked_scale(value):
    """A LoRALinear's ``scale`` as a float: a TypeError or ValueError naming
    what it was where it is not a finite real number."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value  # traced by torch.compile, which takes it to be finite
    scale = float_scale("LoRALinear", value)
    if not math.isfinite(scale):
        raise ValueError(f"LoRALinear: scale must be finite, got {scale}")
    return scale


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank adapter (LoRA).

    ``y = base(x) + scale·(dropout(x)·Aᵀ)·Bᵀ`` with ``A`` (rank, in_features),
    ``B`` (out_features, rank) and ``scale = alpha / rank`` (alpha defaults to
    rank), or ``alpha / √rank`` with ``rslora=True`` (rank-stabilised LoRA,
    peft's ``use_rslora``). Without dropout the whole layer is one fused
    ``lora_linear`` call (which reads ``base.weight``); where calling ``base``
    would run hooks (its own forward hooks or pre-hooks, torch's global ones),
    it is ``base(x)`` plus the adapter, so that they run.

    ``init="default"`` (peft's): A Kaiming-uniform, B zero, so the layer starts
    equal to ``base``; ``init="gaussian"``: A normal with standard deviation
    1/rank, B zero (peft's ``"gaussian"``). ``init="pissa"``: the leading
    ``rank`` singular triplets of ``base.weight`` go into A and B (split
    evenly, and divided by ``scale``) and ``base.weight`` keeps the residual,
    so the output is again unchanged at the start; ``base.weight`` is modified
    in place, as in peft. ``init="pissa_niter_<n>"`` finds the triplets by a
    randomized SVD with n subspace iterations (peft's fast PiSSA: about 40
    times faster on a 4096 × 4096 layer; the triplets are approximate, the
    residual is exact, so the output is still unchanged).

    ``base``'s parameters are frozen (``requires_grad=False``); an
    ``nn.Linear`` subclass with a forward of its own is refused (TypeError),
    as the fused call would not run it. :meth:`merge` folds ``scale·B·A`` into
    ``base.weight``; :meth:`unmerge` takes it out. While merged, the state
    dict also holds what unmerge needs and the merged weights no longer give
    (a DoRA layer's ``_dora_norms``, a LowRankLinear base's own ``_base_A``
    and ``_base_B`` where merging refolded its factors), so that a merged
    layer's state loads into a merged layer and unmerges there. Whether the
    state is merged goes in its metadata: loading it into a layer that is
    not (or is) merged, or an adapter without its base weight into a merged
    layer, is a RuntimeError. ``scale`` cannot change while merged, and a base
    whose weight is recomputed at every use (a parametrization, torch's
    weight_norm hook) cannot be merged into.

    ``use_dora=True`` is DoRA (peft's ``use_dora``): a trainable ``magnitude``
    per output row, initialised to the row norms of ``W + scale·B·A``, and
    ``y = magnitude / ‖W + scale·B·A‖ ⊙ (x·(W + scale·B·A)ᵀ) + bias``, the norm
    treated as a constant in the backward (as the DoRA paper and peft do) and
    formed a block of rows at a time. The norm is recomputed on every call
    (about d·k·rank multiply-adds): merge the adapter for inference.

    ``base`` may also be a transformers ``Conv1D`` (GPT-2's linear layers,
    weight stored as (in, out)); the adapter then works on its transpose, as
    peft's ``fan_in_fan_out=True`` does.

    ``base`` may also be a :class:`LowRankLinear` (LoRA on a compressed model,
    to win back what the truncation lost while its factors stay frozen): the
    layer computes ``base(x) + scale·(x·Aᵀ)·Bᵀ``. PiSSA needs a dense weight
    and is refused there. :meth:`merge` stays exact by appending the adapter
    to the base's factors, ``A₀ → [A₀; A]`` and ``B₀ → [B₀, scale·B]``, so the
    merged base has rank ``base.rank + rank`` (new ``A``/``B`` parameters,
    frozen as before); :meth:`unmerge` gives the base its own factors back.
    """

    # False inside lowrank_ext.disable_lora: forward is base(x) alone. (A class
    # default, so that layers pickled before it existed still load.)
    adapter_enabled = True
    # The init the layer was built with, which reset_parameters repeats (a class
    # default for layers pickled before it was kept: peft's default).
    init = "default"
    # Whether ``scale`` was set anew after construction (see __setattr__; a
    # class default for layers pickled before it was kept).
    _scale_changed = False

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *,
                 init: str = "default", dropout: float = 0.0, rslora: bool = False,
                 use_dora: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Linear, LowRankLinear)) and not is_conv1d(base):
            kind = type(base)
            quantized = "quantiz" in kind.__module__
            raise TypeError(f"LoRALinear: base must be an nn.Linear, a LowRankLinear or a "
                            f"transformers Conv1D, got {kind.__module__}.{kind.__qualname__}"
                            + ("; quantize after lx.merge_lora" if quantized else ""))
        if isinstance(base, nn.Linear):
            check_plain_linear_forward("LoRALinear", "base", base)
            check_initialized("LoRALinear", "base", base)
        elif is_conv1d(base):
            # Read as a weight too (a LowRankLinear base is called: it runs one).
            check_no_instance_forward("LoRALinear", "base", base)
        # (out, in) whatever the base's layout: a Conv1D keeps its weight
        # transposed (a LowRankLinear's weight is a placeholder with that shape).
        weight = dense_weight(base)
        d, k = weight.shape
        if weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"LoRALinear: base must have a float32, float64, float16 or "
                            f"bfloat16 weight, got {dtype_name(weight.dtype)}")
        check_rank("LoRALinear", rank, d, k)
        alpha = check_lora_options("LoRALinear", rank, alpha, init, dropout, rslora, use_dora)
        check_lora_init_fits_base("LoRALinear", init, base, use_dora=use_dora)

        self.rank = int(rank)
        self.alpha = float(alpha)
        self.rslora = rslora
        self.init = init
        self.scale = self.alpha / (math.sqrt(self.rank) if rslora else self.rank)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        A = torch.empty(rank, k, **factory)
        B = torch.zeros(d, rank, **factory)
        residual = None
        if init in ("default", "gaussian"):
            _draw_adapter_A(A, init, self.rank)
        else:
            niter = _PISSA_NITER.fullmatch(init)
            how = ({} if niter is None else
                   {"method": "randomized", "niter": int(niter.group(1))})
            with torch.no_grad():
                B_full, A_full = svd_truncate(dense_weight(base).detach(), rank, balanced=True,
                                              **how)
                root = math.sqrt(self.scale)
                B, A = B_full / root, A_full / root
                residual = dense_weight(base).detach() - dense_product(B, A, self.scale)
        magnitude = None
        if use_dora:  # the norms of the layer's starting weight: the output is unchanged
            weight = residual if residual is not None else dense_weight(base)
            magnitude = dora_row_norms(weight, B, A, self.scale)
        # Everything is computed: only now change what the caller gave.
        self.base = base
        if residual is not None:
            with torch.no_grad():
                dense_weight(self.base).copy_(residual)
        self.base.requires_grad_(False)  # (after the one write that could fail)
        # Outside inference mode, as in LowRankLinear.from_factors: an adapter
        # added under torch.inference_mode() could never be trained nor loaded.
        with torch.inference_mode(False):
            self.A = nn.Parameter(_normal_tensor(A))
            self.B = nn.Parameter(_normal_tensor(B))
            self.register_parameter("magnitude", None if magnitude is None
                                    else nn.Parameter(_normal_tensor(magnitude)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # torch's nn.TransformerEncoderLayer, in inference, runs a fused path
        # that reads linear1/linear2.weight (the base's, above) and never
        # calls this layer, dropping the adapter; it leaves that path whenever
        # a submodule has a hook. replace_module adds this one to the layers
        # it places; here it also covers a layer assigned by hand.
        self.register_forward_pre_hook(_run_the_module)

    def __setattr__(self, name, value):
        # A scale set anew (a schedule, say) may change between calls: under
        # torch.compile forward then keeps it out of the fused op's float
        # argument, which would compile a graph per value (see
        # ops.lora_linear_changing_scale). Other layers keep the one fused op.
        if name == "scale":
            # Checked here, not only by the fused op: merge() folds it into the
            # base weight (a NaN would destroy it for good), and the path over a
            # LowRankLinear base never reaches the op's check.
            value = _checked_scale(value)
            if self.__dict__.get("merged") and value != self.__dict__.get("scale"):
                # unmerge() would take out scale·B·A at the new scale.
                raise RuntimeError(
                    f"LoRALinear: scale cannot change from {self.scale:g} to {value:g} while "
                    "the layer is merged (its base weight holds the adapter at the old "
                    "scale); unmerge() first")
            if "scale" in self.__dict__:
                self.__dict__["_scale_changed"] = True
        super().__setattr__(name, value)

    @property
    def in_features(self):
        return self._size(1, "in_features")

    @property
    def out_features(self):
        return self._size(0, "out_features")

    def _size(self, dim, name):
        if isinstance(self.base.weight, (Tensor, torch.fx.Proxy)):
            return dense_weight(self.base).shape[dim]
        # A base swapped for one without a dense weight (quantize_dynamic's
        # quantized Linear, whose weight is a method) still tells its sizes.
        # An AttributeError raised here would read as "LoRALinear has no
        # attribute 'in_features'" (nn.Module.__getattr__ takes it over).
        size = getattr(self.base, name, None)
        if not is_int(size):
            raise TypeError(self._no_dense_weight())
        return size

    def _no_dense_weight(self):
        kind = type(self.base)
        return (f"LoRALinear: the base layer was replaced by "
                f"{kind.__module__}.{kind.__qualname__}, whose weight is a "
                f"{type(self.base.weight).__name__}, not a Tensor; LoRALinear needs its dense "
                "weight (quantize after lx.merge_lora, or leave the LoRALinear layers out of "
                "the quantization)")

    # Code written for nn.Linear reads these (transformers' T5 checks
    # ``wo.weight.dtype`` in its forward); peft's LoRA layers expose them too.
    @property
    def weight(self):
        """``base.weight`` (with the adapter folded in while :attr:`merged`)."""
        return self.base.weight

    @property
    def bias(self):
        """``base.bias`` (None without one)."""
        return self.base.bias

    def forward(self, input):
        # (Named as nn.Linear's, so that a caller's layer(input=x) still works.)
        x = input
        if isinstance(x, Tensor) and x.is_nested:
            return per_sequence(self.forward, x)
        base = self.base
        if self.merged or not self.adapter_enabled:
            return base(x)
        if isinstance(base, LowRankLinear):
            # Two low-rank products: one call on concatenated factors would
            # copy both factor pairs on every call, which costs more than the
            # second pass over y for the few-row inputs of generation.
            return _plus_scaled(base(x), lowrank_linear(self.dropout(x), self.A, self.B),
                                self.scale)
        weight = dense_weight(base)
        if not isinstance(weight, (Tensor, torch.fx.Proxy)):
            raise TypeError(self._no_dense_weight())
        if self.use_dora:
            return self._dora_forward(x)
        # The fused call reads the base's weight and never calls the base:
        # where calling it runs hooks, they would be skipped.
        if (self.training and isinstance(self.dropout, nn.Dropout)) or _runs_hooks(base):
            # The adapter sees dropout(x), the base layer x itself (as in peft).
            self._check_input(x)
            return base(x) + self.scale * lowrank_linear(self.dropout(x), self.A, self.B)
        fused = lora_linear_changing_scale if self._scale_changed else lora_linear
        return fused(x, weight, self.A, self.B, base.bias, self.scale)

    @torch.no_grad()
    def reset_parameters(self):
        """Draw the adapter afresh as :attr:`init` did: ``A`` as at construction,
        ``B`` zero, and a DoRA layer's ``magnitude`` the row norms of the base
        weight (``B`` being zero), so that the layer's output is ``base(x)``.

        ``base`` is left alone: it resets itself, as meta-device recipes call
        every module's ``reset_parameters`` (``to_empty`` then a loop over
        ``model.modules()``; FSDP's materialization). ``A`` and ``B`` do not
        depend on the base, so any order does. A DoRA magnitude is read off
        ``base.weight`` as it is when this runs: call it once the base holds
        its values (reset or loaded). ``model.modules()`` lists parents before
        children, so a loop over it leaves DoRA magnitudes computed from the
        uninitialized base: call ``reset_parameters()`` on the DoRA layers again
        after it. Where the base weight is still on the meta device (FSDP1
        materializes parents first) it raises a RuntimeError rather than guess.

        RuntimeError too for PiSSA (``init="pissa..."``, which split a base
        weight that now holds the residual and cannot be redone) and for a
        merged layer (whose base weight holds the adapter).
        """
        owner = "LoRALinear.reset_parameters"
        if self.merged:
            raise RuntimeError(f"{owner}: the layer is merged (its base weight holds the "
                               "adapter); unmerge() it first")
        if self.init not in ("default", "gaussian"):
            raise RuntimeError(
                f"{owner}: init={self.init!r} took A and B out of the base weight, which "
                "holds the residual now, so it cannot be redone; build the layer afresh on "
                "the base's original weights")
        _draw_adapter_A(self.A, self.init, self.rank)
        self.B.zero_()
        if self.use_dora:
            weight = dense_weight(self.base)
            if weight.is_meta and not self.magnitude.is_meta:
                raise RuntimeError(
                    f"{owner}: use_dora=True sets magnitude to the row norms of base.weight, "
                    "which is still on the meta device; materialize and reset the base "
                    "layer first (children before parents)")
            self.magnitude.copy_(dora_row_norms(weight, self.B, self.A, self.scale))

    def _weight_keys(self, prefix):
        """The state's keys of what merge() changes: the adapter's, and the base's weights."""
        own = ["A", "B"] + (["magnitude"] if self.use_dora else [])
        base = ["A", "B"] if isinstance(self.base, LowRankLinear) else ["weight"]
        return ([prefix + key for name in own for key in _state_keys(self, name)]
                + [f"{prefix}base.{key}" for name in base for key in _state_keys(self.base, name)])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Whether the state is merged (its base weight holding the adapter)
        # goes with it, in the state's per-module metadata (kept by
        # torch.save, not by safetensors), for _load_from_state_dict to check.
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and isinstance(metadata.get(prefix[:-1]), dict):
            metadata[prefix[:-1]]["lora_merged"] = bool(self.merged)
        # What merge() kept for unmerge() is in the state only while merged
        # (unmerged states keep their keys, as peft's), as buffers outside
        # the state dict; without it a merged state loaded into a merged
        # layer would unmerge to that layer's own old weights.
        for name in _KEPT_FOR_UNMERGE:
            kept = self._buffers.get(name)
            if kept is not None:
                destination[prefix + name] = kept if keep_vars else kept.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        given = {name: state_dict[prefix + name] for name in _KEPT_FOR_UNMERGE
                 if prefix + name in state_dict}
        needed = [name for name in _KEPT_FOR_UNMERGE if self._buffers.get(name) is not None]
        # Refused before this layer or its base change (torch goes on to load
        # the base after this): a mismatch would leave an unmerge() that
        # silently gives other weights than the saved layer's.
        where = f"LoRALinear {prefix[:-1]!r}" if prefix else "LoRALinear"
        weights = [key for key in self._weight_keys(prefix) if key in state_dict]
        saved_merged = local_metadata.get("lora_merged")
        # A and B are the same merged or not: only a base weight tells.
        base_given = any(key.startswith(prefix + "base.") for key in weights)
        if base_given and saved_merged is not None and bool(saved_merged) != self.merged:
            raise RuntimeError(
                f"{where}: the state was saved from {'a ' if saved_merged else 'an un'}merged "
                f"layer, but this layer is {'' if self.merged else 'not '}merged, so its "
                f"adapter would be {'added twice' if saved_merged else 'left out'}; "
                f"{'merge' if saved_merged else 'unmerge'}() it before loading")
        if self.merged and given and not weights:
            # What merge() keeps goes with the merged weight it was kept for.
            raise RuntimeError(
                f"{where}: this layer is merged, and the state holds {', '.join(given)} "
                "without the base weight and adapter they go with, which together make what "
                "unmerge() restores; load them together, or unmerge() the layer first")
        if self.merged and weights and len(weights) < len(self._weight_keys(prefix)):
            # A merged base weight holds the adapter it was merged with: loading
            # one without the other leaves an unmerge() that takes out another.
            missing = sorted(set(self._weight_keys(prefix)) - set(weights))
            raise RuntimeError(
                f"{where}: this layer is merged, so its adapter and its base weight load "
                f"together or not at all, but the state holds {', '.join(weights)} without "
                f"{', '.join(missing)}; unmerge() the layer before loading an adapter alone")
        if not self.merged:
            if given:
                raise RuntimeError(
                    f"{where}: the state holds {', '.join(given)}, which only a merged layer's "
                    "state holds, but this layer is not merged; merge() it before loading")
        elif given or (needed and weights):  # a state of the bias alone loads either way
            if sorted(given) != sorted(needed):
                raise RuntimeError(
                    f"{where}: this merged layer's unmerge() needs "
                    f"{', '.join(needed) or 'none of the tensors merge() keeps'} from the "
                    f"state, which holds {', '.join(given) or 'none of them'}: a state saved "
                    "unmerged (unmerge() this layer before loading it) or merged by an older "
                    "version (which did not save them: it cannot be unmerged)")
            for name, value in given.items():
                kept = self._buffers[name]
                if not isinstance(value, Tensor) or value.shape != kept.shape:
                    seen = (f"shape {list(value.shape)}" if isinstance(value, Tensor)
                            else f"a {type(value).__name__}")
                    raise RuntimeError(f"{where}: {prefix + name} must have shape "
                                       f"{list(kept.shape)}, got {seen}")
        if given:  # not among the tensors torch's own loading looks for: kept from it
            taken = {prefix + name for name in given}
            state_dict = {key: value for key, value in state_dict.items() if key not in taken}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name, value in given.items():
            if local_metadata.get("assign_to_params_buffers", False):
                self._buffers[name] = value
            else:
                with torch.no_grad():
                    self._buffers[name].copy_(value)

    def _check_input(self, x):
        """lora_linear's checks of ``x``, for the paths that run the base layer
        on it first: its errors ("mat1 and mat2 ...") name nothing, and
        training with dropout should refuse what inference refuses, alike."""
        # Under torch.compile the scale may be a symbolic float, which
        # math.isfinite cannot trace (lora_linear skips it there too).
        scale = 1.0 if torch.compiler.is_compiling() else self.scale
        check_lora_linear_tensors(x, dense_weight(self.base), self.A, self.B, self.base.bias,
                                  scale)

    @property
    def use_dora(self) -> bool:
        """Whether the layer is DoRA (it has a ``magnitude``, a parametrized
        one too, which torch moves out of ``_parameters``)."""
        return (self._parameters.get("magnitude") is not None
                or torch.nn.utils.parametrize.is_parametrized(self, "magnitude"))

    def _dora_scale(self, norms=None):
        """magnitude / ‖W + scale·B·A‖ per output row; gradients reach the magnitude only."""
        if norms is None:
            norms = dora_row_norms(dense_weight(self.base), self.B, self.A, self.scale)
        return _dora_factor(self.magnitude, norms)

    def _dora_forward(self, x):
        weight, bias = dense_weight(self.base), self.base.bias
        if (self.training and isinstance(self.dropout, nn.Dropout)) or _runs_hooks(self.base):
            # peft's form: the base layer sees x, the rescaled part dropout(x);
            # the result takes the base's dtype, as in peft (under autocast).
            self._check_input(x)
            factor = self._dora_scale()
            dropped = self.dropout(x)
            base = self.base(x)
            out = (base + (factor - 1) * torch.nn.functional.linear(dropped, weight)
                   + factor * (self.scale * lowrank_linear(dropped, self.A, self.B)))
            return out.to(base.dtype)
        return dora_forward(x, weight, self.A, self.B, bias, self.magnitude, self.scale,
                            scale_changes=self._scale_changed)

    def _cannot_merge(self):
        """Why the base layer cannot take the adapter, or None: a weight (or
        factors) recomputed at every use would lose it at the next call."""
        # merge() rewrites the dense weight, or a LowRankLinear's factors.
        tensors = ("A", "B") if isinstance(self.base, LowRankLinear) else ("weight",)
        if any(_elements_share_memory(getattr(self.base, t)) for t in tensors):
            return _SHARED_ELEMENTS_WHY
        if fsdp_managed(self):
            # (A unit holding this layer from outside is not visible here:
            # lx.merge_lora looks at the whole model.)
            return FSDP_MERGE_WHY
        # Last: a weight a hook recomputes is an inference tensor after a
        # call under inference_mode, and the hook is what must go.
        return weight_recomputed(self.base, tensors) or (
            inference_weight_why(dense_weight(self.base)) if tensors == ("weight",) else None)

    def merge(self) -> LoRALinear:
        """Fold the adapter into ``base.weight`` (a LowRankLinear base: into its
        factors, whose rank grows by ``rank``); forward is then ``base(x)`` alone."""
        return self._merge(warn=True)

    def _warn_of_merged_rank(self):
        """Warn where merging into a LowRankLinear base leaves it no smaller than
        a dense layer."""
        if isinstance(self.base, LowRankLinear):
            d, k = self.base.out_features, self.base.in_features
            merged_rank = min(self.base.rank + self.rank, d, k)
            if merged_rank >= break_even_rank(d, k):
                warnings.warn(f"LoRALinear.merge: the merged layer has rank {merged_rank}, at "
                              f"or past d·k/(d+k) = {break_even_rank(d, k):.1f}: it holds "
                              "at least as many numbers as a dense layer (base.to_linear() "
                              "would hold no more)",
                              stacklevel=stacklevel_outside_package())

    @torch.no_grad()
    def _merge(self, warn):
        """merge(); ``warn=False`` for lx.merge_lora, which gives the warnings
        before it merges the first layer."""
        if self.merged:
            warnings.warn("LoRALinear.merge: already merged; nothing to do",
                          stacklevel=stacklevel_outside_package())
            return self
        tied = getattr(self, "_weight_tied_to", ())
        if warn and tied and not isinstance(self.base, LowRankLinear):
            # The layer cannot see the model to tell whether the tie still
            # holds (lx.merge_lora checks it afresh and refuses).
            warnings.warn(
                f"LoRALinear.merge: the base weight was tied to {', '.join(tied)} when the "
                "adapter was added; if it still is, merging changes that too (lx.merge_lora "
                "refuses such layers)", stacklevel=stacklevel_outside_package())
        if not self.adapter_enabled:
            raise RuntimeError(
                "LoRALinear.merge: the adapter is disabled (inside lx.disable_lora), where the "
                "layer gives its base's outputs alone, which a merged weight would no longer "
                "give; merge after the block")
        why = self._cannot_merge()
        if why:
            raise RuntimeError(f"LoRALinear.merge: the base layer cannot take the adapter: "
                               f"{why}. Unmerged, the layer computes the same")
        if warn:  # before anything changes: as an error it leaves the layer as it was
            self._warn_of_merged_rank()
        if isinstance(self.base, LowRankLinear):
            # Exact: the adapter's rank joins the base's, B₀A₀ + s·BA = [B₀, s·B]·[A₀; A].
            base = self.base
            # New factors made outside inference mode, so that they stay
            # trainable after a merge() under torch.inference_mode().
            with torch.inference_mode(False):
                A = torch.cat([base.A, self.A.to(base.A.dtype)])
                B = torch.cat([base.B, (self.scale * self.B).to(base.B.dtype)], dim=1)
            d, k = base.out_features, base.in_features
            if A.shape[0] > min(d, k):
                # More ranks than the matrix has: the same product at rank
                # min(d, k), the base's own factors kept (moving with the layer,
                # outside the state dict) for unmerge.
                with torch.inference_mode(False):  # (load_state_dict copies into them)
                    self.register_buffer("_base_A", base.A.detach().clone(), persistent=False)
                    self.register_buffer("_base_B", base.B.detach().clone(), persistent=False)
                    B, A = _full_rank_factors(B, A)
            # The base's own Parameters, which unmerge() puts back (a plain
            # attribute: not in the state dict, nor among the parameters).
            self.__dict__["_base_parameters"] = (base.A, base.B)
            with torch.inference_mode(False):
                _replace_factors(base, A, B)
        else:
            weight = dense_weight(self.base)  # a view: the base's own tensor changes
            merged, norms = self._merged_weight(weight)
            self._check_merged_in_range(merged, weight)
            if norms is not None:
                # Kept for unmerge: the norm of the unmerged weight, which the
                # merged one no longer gives (peft keeps it too). A buffer, so
                # that it moves with the layer, outside the state dict; made
                # outside inference mode, as the factors of a LowRankLinear
                # base are: a later load_state_dict copies into it.
                with torch.inference_mode(False):
                    self.register_buffer("_dora_norms", norms, persistent=False)
            weight.copy_(merged)
        self.merged = True
        return self

    def _merged_weight(self, weight):
        """(the dense base ``weight`` with the adapter folded in, in its dtype;
        DoRA's row norms of the unmerged weight, else None)."""
        update = dense_product(self.B, self.A, self.scale)
        if not self.use_dora:
            return in_buffer(torch.add, update, weight).to(weight.dtype), None
        with torch.inference_mode(False):
            norms = dora_row_norms(weight, self.B, self.A, self.scale)
        factor = self._dora_scale(norms).unsqueeze(1)
        merged = in_buffer(torch.mul, in_buffer(torch.add, update, weight), factor)
        return merged.to(weight.dtype), norms

    @torch.no_grad()
    def _check_merge_fits(self):
        """The range check of merge(), without merging: lx.merge_lora runs it
        on every layer before merging the first."""
        if not self.merged and not isinstance(self.base, LowRankLinear):
            weight = dense_weight(self.base)
            self._check_merged_in_range(self._merged_weight(weight)[0], weight)

    def _check_merged_in_range(self, merged, weight):
        """Refuse a merged weight past its dtype's range (float16 near 65504),
        before it replaces the base's, which unmerge() could not bring back
        from inf. Unmerged, the layer computes the same."""
        if holds_values(merged) and not all_finite(merged) and all(
                map(all_finite, (weight, self.A, self.B))):
            if self.use_dora and not all_finite(self.magnitude):
                raise ValueError(
                    "LoRALinear.merge: the DoRA magnitude holds values that are not finite "
                    f"(in {dtype_name(self.magnitude.dtype)}), which the merged weight would "
                    "take for good; the layer is left unmerged")
            raise ValueError(
                f"LoRALinear.merge: the merged weight exceeds the range of "
                f"{dtype_name(weight.dtype)}, and the base weight could not be brought back "
                "from it; the layer is left unmerged (it computes the same): merge a float32 "
                "copy instead")

    @torch.no_grad()
    def unmerge(self) -> LoRALinear:
        """Take the adapter back out of the base layer (undoes :meth:`merge`)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: not merged; nothing to do",
                          stacklevel=stacklevel_outside_package())
            return self
        if fsdp_managed(self):
            raise RuntimeError(f"LoRALinear.unmerge: the layer cannot be unmerged here: "
                               f"{FSDP_MERGE_WHY.replace('merge in', 'unmerge in')}")
        why = (None if isinstance(self.base, LowRankLinear) else
               inference_weight_why(dense_weight(self.base)))
        if why:
            raise RuntimeError(f"LoRALinear.unmerge: the base layer cannot give the adapter "
                               f"back: {why}. The layer is left merged")
        if isinstance(self.base, LowRankLinear):
            base = self.base
            originals = self.__dict__.get("_base_parameters")
            if "_base_A" in self._buffers:  # merge() had to fold the ranks together
                _restore_factors(base, self._base_A, self._base_B, originals)
                del self._base_A, self._base_B
            else:
                # merge() appended the adapter's rank columns: keep the base's own, bit
                # for bit.
                own = base.rank - self.rank
                _restore_factors(base, base.A[:own], base.B[:, :own], originals)
            self.__dict__.pop("_base_parameters", None)
        elif self.use_dora:
            weight = dense_weight(self.base)
            factor = self._dora_scale(self._dora_norms)
            lost = (factor == 0) & (self._dora_norms > 0)
            # (Meta and fake tensors hold no values to check.)
            if holds_values(lost) and bool(lost.any()):
                raise RuntimeError(
                    f"LoRALinear.unmerge: {int(lost.sum())} row(s) have magnitude 0, so merge() "
                    "set them to zero and their weights cannot be recovered")
            # Rows with factor 0 and norm 0 held W = -scale·B·A, which the subtraction gives.
            factor = factor.unsqueeze(1)
            kept = torch.where(factor == 0, torch.zeros_like(weight), weight / factor)
            weight.copy_(kept - dense_product(self.B, self.A, self.scale))
            del self._dora_norms
        else:
            weight = dense_weight(self.base)
            weight -= dense_product(self.B, self.A, self.scale)
        self.merged = False
        return self

    def __getstate__(self):
        # Inside the block the adapter is off only for the block, and the
        # trained heads from peft's modules_to_save are out of the module tree
        # (their originals stand in): a copy or a file made there would keep
        # the adapter off for good, with no trained head in it.
        if not self.adapter_enabled:
            raise RuntimeError(
                "LoRALinear: cannot copy or pickle a layer inside lx.disable_lora (copy.deepcopy, "
                "torch.save of a model): the copy would keep its adapter disabled for good and "
                "would lack the trained modules_to_save heads the block swaps out; copy or save "
                "the model outside the block")
        return super().__getstate__()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, "
                f"{'use_dora=True, ' if self.use_dora else ''}merged={self.merged}")
