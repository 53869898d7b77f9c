"""``torch.func`` transforms (grad, vjp, jacrev, vmap of grad) over the public ops.

functorch cannot see through an autograd formula registered on an op as a
kernel, neither the C++ one nor a Python ``autograd.Function`` written in the
``ctx``-in-forward style, so under a transform ``lowrank_linear`` and
``lora_linear`` go through the ``autograd.Function`` classes below instead:
``forward`` without ``ctx`` plus ``setup_context``, which is the form functorch
supports. Their forward is the same dispatcher op (with the intermediate
kept), their backward the pure-torch formulas of ``_library``, which are
themselves differentiable (so ``jacrev(jacrev(f))`` and ``vmap(grad(f))``
work), their ``jvp`` gives forward mode (``jacfwd``, ``hessian``), and their
vmap rule is generated from those, with the ops' own batching rules
(``_vmap``) underneath. Forward-mode AD through dual tensors
(``torch.autograd.forward_ad``) takes the same route: the ops' autograd kernels
have no forward formula.

The Functions run above the dispatcher's autocast kernels, so inside
``torch.autocast`` the arguments are cast first, as those kernels cast them:
the saved tensors then have the dtype of the output's gradient, and the
gradients flow back through the casts.

Under two or more forward-mode transforms (``jacfwd(jacfwd(f))``), where
torch drops the outer tangent of every Function's ``jvp``, the ops run as the
fallback's ATen composition instead.

Outside a transform or forward-mode AD nothing here runs.
"""

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn import functional as F

from . import _fallback
from ._library import _lora_grads, _lowrank_grads, ops
from ._vmap import autocast_arguments

transforms_active = torch._C._functorch.peek_interpreter_stack


def has_tangents(*args):
    """Whether forward-mode AD is on and an argument is a dual tensor (the
    ops' autograd kernels have no forward formula). With forward grad mode
    off, ATen's ops ignore tangents, and so do the ops."""
    if fwAD._current_level < 0 or not torch._C._is_fwd_grad_enabled():
        return False  # no dual level open (so no tangents), or tangents ignored
    return any(isinstance(arg, torch.Tensor) and fwAD.unpack_dual(arg).tangent is not None
               for arg in args)


class LowRankLinearFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, A, B, bias):
        return ops.lowrank_linear_with_intermediate.default(x, A, B, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, A, B, _ = inputs
        ctx.save_for_backward(x, A, B, output[1])
        ctx.save_for_forward(x, A, B, output[1])

    @staticmethod
    def backward(ctx, gy, gt):
        x, A, B, t = ctx.saved_tensors
        return _lowrank_grads(ctx.needs_input_grad, gy, x, A, B, t, gt_out=gt)

    @staticmethod
    def jvp(ctx, dx, dA, dB, dbias):
        x, A, B, t = ctx.saved_tensors
        dt = _tangent_of_intermediate(x, A, dx, dA)
        dy = _sum_terms(
            None if dt is None else F.linear(dt, B),
            None if dB is None else F.linear(t, dB), dbias)
        # The intermediate's own tangent: vmap's generated rule (jvp of a
        # vmap) asks for one for every output. The saved t is an output of
        # this Function, so where a tangent that uses it (t·dBᵀ) is itself
        # differentiated in reverse mode (jacrev(jacfwd(f)), grad of a jvp),
        # the gradient reaches t and backward passes it on to x and A.
        return _full_tangent(dy, x, B.shape[0]), _full_tangent(dt, x, A.shape[0])


class LoRALinearFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, W, A, B, bias, scale):
        return ops.lora_linear_with_intermediate.default(x, W, A, B, bias, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, A, B, _, scale = inputs
        ctx.save_for_backward(x, W, A, B, output[1])
        ctx.save_for_forward(x, W, A, B, output[1])
        ctx.scale = scale

    @staticmethod
    def backward(ctx, gy, gt):
        x, W, A, B, t = ctx.saved_tensors
        return (*_lora_grads(ctx.needs_input_grad[:5], gy, x, W, A, B, t, ctx.scale,
                             gt_out=gt), None)

    @staticmethod
    def jvp(ctx, dx, dW, dA, dB, dbias, _dscale):
        x, W, A, B, t = ctx.saved_tensors
        dt = _tangent_of_intermediate(x, A, dx, dA)
        adapter = _sum_terms(
            None if dt is None else F.linear(dt, B),
            None if dB is None else F.linear(t, dB), None)
        dy = _sum_terms(
            None if dx is None else F.linear(dx, W),
            None if dW is None else F.linear(x, dW),
            dbias, None if adapter is None else ctx.scale * adapter)
        return _full_tangent(dy, x, W.shape[0]), _full_tangent(dt, x, A.shape[0])


def _tangent_of_intermediate(x, A, dx, dA):
    """The tangent of t = x·Aᵀ, or None when neither x nor A has one."""
    return _sum_terms(None if dx is None else F.linear(dx, A),
                      None if dA is None else F.linear(x, dA))


def _sum_terms(*terms):
    terms = [term for term in terms if term is not None]
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _full_tangent(tangent, x, d):
    """The output's tangent at the output's shape (a bias tangent alone is (d,))."""
    shape = (*x.shape[:-1], d)
    if tangent is None:
        return x.new_zeros(shape)
    return tangent if tangent.shape == shape else tangent.expand(shape)


def nested_forward_mode():
    """Whether two or more forward-mode transforms are active (``jvp`` of a
    ``jvp``, ``jacfwd(jacfwd(f))``). torch then drops the outer tangent of
    any ``autograd.Function``'s ``jvp``, a plain one too: the mixed second
    derivatives came out 0. The ops then run as the fallback's composition of
    ATen ops, which functorch differentiates itself."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return sum(1 for level in stack
               if level.key() == torch._C._functorch.TransformType.Jvp) >= 2


def lowrank_linear(x, A, B, bias):
    args = autocast_arguments(x, A, B, bias)
    if nested_forward_mode():
        return _fallback.lowrank_linear(*args)
    return LowRankLinearFunction.apply(*args)[0]


def lora_linear(x, W, A, B, bias, scale):
    args = autocast_arguments(x, W, A, B, bias)
    if nested_forward_mode():
        return _fallback.lora_linear(*args, scale)
    return LoRALinearFunction.apply(*args, scale)[0]
