"""``LowRankLinear``, the compressed layer over the fused op, and the checks and
helpers it shares with ``LoRALinear`` (``lora_layer.py``).

``LowRankLinear`` stores a linear map as two factors ``W ≈ B·A`` and never forms
``W``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref

import numpy as np
import torch
from torch import Tensor, nn

from ._amp import outside_autocast
from ._checks import SUPPORTED_DTYPES, dtype_name, holds_values, is_int
from ._modules import has_own_forward, instance_forward, instance_forward_text
from .ops import lowrank_linear
from .svd import svd_truncate

_HALF = (torch.float16, torch.bfloat16)


def check_positive_int(owner, name, value):
    if not is_int(value):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")


def check_rank(owner, rank, d, k):
    check_positive_int(owner, "rank", rank)
    if rank > min(d, k):
        raise ValueError(
            f"{owner}: rank must be in [1, {min(d, k)}] for a layer with out_features={d} and "
            f"in_features={k}, got {rank}")


def inference_weight_why(weight):
    """Why ``weight`` cannot be changed in place here, or None: torch's
    in-place write to an inference tensor outside inference mode changes it
    and then raises, which would leave a merge half done."""
    if weight.is_inference() and not torch.is_inference_mode_enabled():
        return ("its weight is an inference tensor (made under torch.inference_mode()), "
                "which only code inside torch.inference_mode() can change; merge or unmerge "
                "inside that mode, or give the base layer a copy of its weight made outside "
                "it (weight.clone())")
    return None


def break_even_rank(d, k):
    """The rank at which ``B·A`` costs as many parameters as ``W``: d·k/(d+k)."""
    return d * k / (d + k)


def rank_for_ratio(d, k, ratio):
    """⌊ratio·d·k/(d+k)⌋, at least 1: the rank keeping ``ratio`` of a d×k weight's parameters."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
    if not 0.0 < ratio <= 1.0:  # NaN fails too
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, min(min(d, k), math.floor(ratio_budget(ratio, d * k) / (d + k))))


# A few ulps of slack on every ratio budget: 0.09·50·40/90 is 2 exactly,
# 1.9999999999999998 in floating point, and must give 2 (energy and tol allow
# the same); compress_model's budgets take the same slack, so that every check
# agrees on what fits.
_RATIO_SLACK = 1e-12


def ratio_budget(ratio, parameters):
    """The parameters ``ratio`` keeps of ``parameters``, with the slack above.
    In Python floats: a numpy float32 ratio would keep the product in float32,
    which holds d·k exactly only below 2²⁴."""
    return float(ratio) * parameters * (1 + _RATIO_SLACK)


def dense_product(B, A, scale=1.0):
    """scale·B·A in B's dtype, computed in float32 for half types (also
    inside an autocast region, which would round it to its half type)."""
    with outside_autocast(B.device.type):
        if B.dtype in _HALF:
            return (B.float() @ A.float()).mul_(scale).to(B.dtype)
        return (B @ A).mul_(scale)  # in the product's buffer: one weight-sized tensor


def in_buffer(op, buffer, other):
    """``op(buffer, other)`` (torch.add, torch.mul) in the dtype torch promotes
    them to, written into ``buffer`` where it has that dtype (a weight-sized
    temporary fewer); ``buffer`` must be a fresh tensor of the caller's."""
    if buffer.dtype == torch.promote_types(buffer.dtype, other.dtype):
        return op(buffer, other, out=buffer)
    return op(buffer, other)


def all_finite(t, block_bytes=1 << 20):
    """Whether every element of ``t`` is finite, a block of rows at a time:
    without a temporary the size of ``t`` (a merged weight may be gigabytes)."""
    if t.dim() < 2 or t.shape[0] == 0:
        return bool(torch.isfinite(t).all())
    rows = max(1, block_bytes // max(1, t[0].numel() * t.element_size()))
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def _outside_fake_mode():
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # a torch without it: no fake mode to leave
        return contextlib.nullcontext()
    return unset_fake_temporarily()


def _untraced(func, args, kwargs):
    """``func(*args, **kwargs)`` with torch.jit.trace's recording paused."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return func(*args, **kwargs)
    finally:
        torch._C._set_tracing_state(state)


class WeightPlaceholder(Tensor):
    """The ``weight`` of a :class:`LowRankLinear`: shape, dtype and device only.

    Reading its metadata works (``dtype``, ``device``, ``shape``, ``size()``,
    ``dim()``, ``requires_grad``, ...); any computation with it raises a
    RuntimeError instead of silently using values the layer does not have.
    Being a tensor with ``__torch_function__`` also keeps torch's
    ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` off their
    fused inference paths, which read Linear weights instead of calling the
    layers. It costs no memory: one element, broadcast.
    """

    _METADATA = frozenset({
        Tensor.dtype.__get__, Tensor.device.__get__, Tensor.shape.__get__,
        Tensor.ndim.__get__, Tensor.layout.__get__, Tensor.requires_grad.__get__,
        Tensor.is_cuda.__get__, Tensor.is_meta.__get__, Tensor.is_sparse.__get__,
        Tensor.is_quantized.__get__, Tensor.is_nested.__get__, Tensor.size, Tensor.dim,
        Tensor.numel, Tensor.nelement, Tensor.element_size, Tensor.is_floating_point,
        Tensor.is_complex, Tensor.get_device, Tensor.__len__, Tensor.__repr__,
    })

    @staticmethod
    def like(reference: Tensor, shape) -> Tensor:
        def make():
            value = torch.full((), math.nan, dtype=reference.dtype, device=reference.device)
            return value.expand(shape).as_subclass(WeightPlaceholder)

        try:
            return make()
        except RuntimeError:
            # torch.export's non-strict tracing (and ONNX export through it)
            # runs under a fake tensor mode, whose tensors cannot become this
            # subclass: the placeholder is made outside that mode, as a real
            # one-element tensor, so that computing with it still raises
            # there instead of tracing NaN into the exported program.
            with _outside_fake_mode():
                return make()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in cls._METADATA:
            raise RuntimeError(
                f"LowRankLinear.weight holds no values ({getattr(func, '__name__', func)} was "
                "called on it): the layer keeps W as the factors B @ A; use layer.to_linear() "
                "or layer.B @ layer.A for the dense matrix")
        # Metadata only: nothing returned is a tensor to wrap again.
        with torch._C.DisableTorchFunctionSubclass():
            if torch._C._get_tracing_state() is None:
                return func(*args, **(kwargs or {}))
            # torch.jit.trace would record the read (aten::size of
            # weight.shape) with the placeholder as a tensor constant, which
            # its check_trace then fails to compare (by computing with it).
            # The metadata is the layer's, fixed: it goes into the trace as
            # plain numbers, and no placeholder is ever kept in a graph.
            return _untraced(func, args, kwargs or {})


def per_sequence(forward, x):
    """``forward`` on each sequence of the nested tensor ``x``, nested again alike.

    torch's nn.TransformerEncoder packs a padded batch into a nested tensor
    when its first layer's weights allow it, and hands it to every layer; a
    layer assigned by hand cannot turn that off (compress_model and add_lora
    do), and the ops take dense tensors.
    """
    return torch.nested.as_nested_tensor([forward(t) for t in x.unbind()], layout=x.layout)


# Each layer's placeholder, built once per dtype, device and shape: a new one
# per access took 5 µs, and T5 reads wo.weight three times per feed-forward
# block. Kept outside the module, so that deepcopy and pickling never meet it.
_PLACEHOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_no_instance_forward(owner, name, layer):
    """Refuse a layer with a forward set on the instance (see
    instance_forward), which a layer computing with its weight would skip."""
    if instance_forward(layer):
        raise TypeError(
            f"{owner}: {name} has {instance_forward_text(layer)}, which would never be "
            "called (the ops read its weight and bias instead); remove it first (accelerate: "
            "remove_hook_from_module), or give a layer without one")


def check_plain_linear_forward(owner, name, layer):
    """Refuse an ``nn.Linear`` subclass with a forward of its own, or a layer
    with a forward set on the instance (see has_own_forward; compress_model
    and add_lora leave such layers alone for the same reason)."""
    check_no_instance_forward(owner, name, layer)
    if has_own_forward(layer):
        raise TypeError(
            f"{owner}: {name} is a {type(layer).__name__}, an nn.Linear subclass with a forward "
            "of its own, which would never be called (the ops read its weight and bias "
            "instead); give an nn.Linear, or a subclass that keeps nn.Linear's forward")


def check_initialized(owner, name, layer):
    """Refuse an uninitialized lazy layer (``nn.LazyLinear`` before its first
    forward), whose weight has no shape yet to factor or adapt."""
    if torch.nn.parameter.is_lazy(layer.weight):
        raise ValueError(
            f"{owner}: {name} is an uninitialized {type(layer).__name__}, whose weight has no "
            "shape until its first forward; run the model once (or give in_features) first")


def inherit_requires_grad(new, layer):
    """Give ``new`` (a LowRankLinear replacing ``layer``) ``layer``'s ``requires_grad`` flags.

    The factors follow the weight and the bias its bias, so that a layer a user
    froze stays frozen once it is replaced. Returns ``new``.
    """
    for factor in (new.A, new.B):
        factor.requires_grad_(layer.weight.requires_grad)
    if new.bias is not None and getattr(layer, "bias", None) is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


class LowRankLinear(nn.Module):
    """``y = (x·Aᵀ)·Bᵀ + bias``: a linear layer stored as rank-``rank`` factors.

    Parameters ``A`` (rank, in_features), ``B`` (out_features, rank) and
    ``bias`` (out_features,). A fresh layer is initialised so that ``B·A`` has
    the entry variance of ``nn.Linear``'s weight (1/(3·in_features)), hence
    outputs of the same scale. Build one from a trained layer with
    :meth:`from_linear`.

    Example:
        >>> layer = LowRankLinear.from_linear(nn.Linear(512, 256), ratio=0.5)
        >>> layer.rank
        85
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_positive_int("LowRankLinear", "in_features", in_features)
        check_positive_int("LowRankLinear", "out_features", out_features)
        check_rank("LowRankLinear", rank, out_features, in_features)
        if isinstance(bias, np.bool_):  # as nn.Linear takes it
            bias = bool(bias)
        if not isinstance(bias, bool):
            raise TypeError(f"LowRankLinear: bias must be a bool, got {type(bias).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype)
                                      and dtype in SUPPORTED_DTYPES):
            # (float8 is floating point too, but the op takes none of them.)
            seen = dtype_name(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)
            raise TypeError(f"LowRankLinear: dtype must be float32, float64, float16 or "
                            f"bfloat16, got {seen}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def rank(self):
        return self.A.shape[0]

    @property
    def weight(self) -> Tensor:
        """A stand-in for code written for ``nn.Linear`` that only inspects the
        weight (transformers' T5 casts its activations to ``wo.weight.dtype``
        in its forward): a :class:`WeightPlaceholder` with the dense weight's
        shape ``(out_features, in_features)``, dtype and device and no values.
        The layer never forms ``B·A``: use :meth:`to_linear` or ``B @ A`` for
        the dense matrix.
        """
        shape = (self.out_features, self.in_features)
        if torch.compiler.is_compiling():
            return WeightPlaceholder.like(self.A, shape)
        key = (self.A.dtype, self.A.device, shape)
        entry = _PLACEHOLDERS.get(self)
        if entry is None or entry[0] != key:
            placeholder = WeightPlaceholder.like(self.A, shape)
            if type(placeholder) is not WeightPlaceholder:
                return placeholder  # a fake tensor of a trace: not kept
            entry = _PLACEHOLDERS[self] = (key, placeholder)
        return entry[1]

    def reset_parameters(self):
        # nn.Linear draws W ~ U(±1/√k): Var(W_ij) = 1/(3k). For W = B·A with
        # independent zero-mean entries Var((B·A)_ij) = r·Var(A)·Var(B), so A
        # takes nn.Linear's law and B gets Var 1/r, i.e. U(±√(3/r)).
        bound_a = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.A, -bound_a, bound_a)
        bound_b = math.sqrt(3.0 / self.rank)
        nn.init.uniform_(self.B, -bound_b, bound_b)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_a, bound_a)

    def forward(self, input):
        # (Named as nn.Linear's, so that a caller's layer(input=x) still works.)
        x = input
        if isinstance(x, Tensor) and x.is_nested:
            return per_sequence(self.forward, x)
        return lowrank_linear(x, self.A, self.B, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, *,
                    energy: float | None = None, tol: float | None = None,
                    ratio: float | None = None, balanced: bool = False,
                    method: str = "exact", niter: int = 2,
                    generator: torch.Generator | None = None) -> LowRankLinear:
        """A ``LowRankLinear`` approximating ``linear`` by truncated SVD of its weight.

        Give exactly one of ``rank``, ``energy``, ``tol`` (as in
        :func:`svd_truncate`) or ``ratio``, the fraction of the weight's
        parameters kept: r = ⌊ratio·d·k/(d+k)⌋ (at least 1). ``balanced``,
        ``method``, ``niter`` and ``generator`` work as in
        :func:`svd_truncate` (``method="randomized"`` draws from
        ``generator``, leaving torch's global one alone). The new layer has
        ``linear``'s device, dtype and training mode and a copy of its bias;
        ``A`` and ``B`` require gradients as ``linear.weight`` does, the bias
        as its bias (a frozen layer stays frozen). ``linear`` itself is not
        changed.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"LowRankLinear.from_linear: linear must be an nn.Linear, got "
                f"{type(linear).__name__}")
        check_plain_linear_forward("LowRankLinear.from_linear", "linear", linear)
        check_initialized("LowRankLinear.from_linear", "linear", linear)
        given = [n for n, v in (("rank", rank), ("energy", energy), ("tol", tol),
                                ("ratio", ratio)) if v is not None]
        if len(given) != 1:
            seen = " and ".join(given) if given else "none"
            raise ValueError(
                "LowRankLinear.from_linear: give exactly one of rank, energy, tol or ratio, "
                f"got {seen}")
        weight = linear.weight.detach()
        d, k = weight.shape
        if weight.numel() == 0:
            raise ValueError(f"LowRankLinear.from_linear: linear has an empty weight ({d}×{k}): "
                             "nothing to factorize")
        if ratio is not None:
            try:
                rank = rank_for_ratio(d, k, ratio)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"LowRankLinear.from_linear: {exc}") from None
        elif rank is not None:
            check_rank("LowRankLinear.from_linear", rank, d, k)
        try:
            B, A = svd_truncate(weight, rank, energy=energy, tol=tol, balanced=balanced,
                                method=method, niter=niter, generator=generator)
        except (TypeError, ValueError) as exc:  # worded for svd_truncate's W: name this call
            message = str(exc)
            if not message.startswith("svd_truncate: "):
                raise
            message = message.removeprefix("svd_truncate: ")
            if message.startswith("W "):
                message = "linear.weight " + message.removeprefix("W ")
            raise type(exc)(f"LowRankLinear.from_linear: {message}") from None
        # (A bias kept in another dtype than the weight takes the weight's.)
        # (from_factors makes the Parameters outside inference mode.)
        new = cls.from_factors(A, B, None if linear.bias is None
                               else linear.bias.detach().to(device=A.device, dtype=A.dtype))
        new.train(linear.training)
        return inherit_requires_grad(new, linear)

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """A layer holding copies of the given factors ``A`` (r, k), ``B`` (d, r) and ``bias``.

        All of one floating dtype and one device, as :func:`lowrank_linear`
        takes them: nothing is converted behind the caller's back.
        """
        owner = "LowRankLinear.from_factors"
        for name, t in (("A", A), ("B", B), ("bias", bias)):
            if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
                raise TypeError(f"{owner}: {name} must be a Tensor, got {type(t).__name__}")
        for name, t in (("A", A), ("B", B)):
            if t.dim() != 2:
                raise ValueError(f"{owner}: {name} must be 2-D, got shape {list(t.shape)}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{owner}: {name} must be float32, float64, float16 or "
                                f"bfloat16, got {dtype_name(t.dtype)}")
        for name, t in (("B", B), ("bias", bias)):
            if t is None:
                continue
            if t.dtype != A.dtype:
                raise TypeError(f"{owner}: {name} has dtype {dtype_name(t.dtype)} but A has dtype "
                                f"{dtype_name(A.dtype)}; give the factors and bias in one dtype")
            if t.device != A.device:
                raise RuntimeError(f"{owner}: {name} is on {t.device} but A is on {A.device}; "
                                   "give them on one device")
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{owner}: B has shape {list(B.shape)} but A has shape "
                f"{list(A.shape)}; need A (r, k) and B (d, r)")
        rank, k = A.shape
        d = B.shape[0]
        if bias is not None and tuple(bias.shape) != (d,):
            raise ValueError(f"{owner}: bias must have shape [d] = [{d}], got shape "
                             f"{list(bias.shape)}")
        with torch.device("meta"):  # skip a random init that is overwritten at once
            layer = cls(k, d, rank, bias=bias is not None, dtype=A.dtype)
        # Outside inference mode: Parameters made under torch.inference_mode()
        # say they require gradients and can never be trained (nor loaded into).
        with torch.inference_mode(False):
            layer.A = nn.Parameter(A.detach().clone().contiguous())
            layer.B = nn.Parameter(B.detach().clone().contiguous())
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` with weight ``B·A`` and this layer's bias.

        The weight requires gradients when the factors do, the bias as this
        layer's bias; the layer has this one's training mode.
        """
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.A.dtype)
        # Outside inference mode, as in from_factors.
        with torch.no_grad(), torch.inference_mode(False):
            weight = dense_product(self.B.detach(), self.A.detach())
            if (holds_values(weight) and not bool(torch.isfinite(weight).all())
                    and bool(torch.isfinite(self.A).all()) and bool(torch.isfinite(self.B).all())):
                # A product rounded past the dtype's range (a float16 weight
                # at 65504, factored and multiplied back) would be inf.
                raise ValueError(
                    f"LowRankLinear.to_linear: B·A exceeds the range of "
                    f"{dtype_name(weight.dtype)}; convert the layer first "
                    "(layer.float().to_linear())")
            linear.weight = nn.Parameter(weight, requires_grad=self.A.requires_grad
                                         or self.B.requires_grad)
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().clone(),
                                           requires_grad=self.bias.requires_grad)
        return linear.train(self.training)


def __getattr__(name):
    # LoRALinear lived here before it had a module of its own: whole models
    # pickled then (torch.save(model)) name it lowrank_ext.nn.LoRALinear.
    # (torch.load(weights_only=True) of such a file allows it by that name:
    # torch.serialization.add_safe_globals([(LoRALinear, "lowrank_ext.nn.LoRALinear")]).)
    if name == "LoRALinear":
        from .lora_layer import LoRALinear

        return LoRALinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
