"""``nn.MultiheadAttention`` with its projections as separate layers, so that they compress.

``nn.MultiheadAttention`` keeps the query, key and value projections packed in
one ``in_proj_weight`` and hands them, with ``out_proj.weight``, to
``F.multi_head_attention_forward``; no Linear layer is ever called, so
nothing can swap them for low-rank ones (torch's ``nn.Transformer*`` modules,
torchvision's ViT and CLIP-style models all attend this way).
``SplitMultiheadAttention`` computes the same function with four ordinary
layers, ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``, which
``compress_model`` then treats like any other ``nn.Linear`` (calibration
included). ``split_attention`` makes the swap across a model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._modules import (COMPILED_ALONE_WHY, Swaps, compiled_alone, compiled_original,
                       instance_forward, keeps_encoder_flags, places_of,
                       refuse_distributed_wrapper, weight_recomputed)
from ._names import preview


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s function and signature, with separate projection layers.

    Same arguments and ``forward`` as ``nn.MultiheadAttention`` (batch_first,
    kdim/vdim, add_bias_kv, add_zero_attn, key_padding_mask, attn_mask,
    need_weights, average_attn_weights, is_causal, unbatched inputs), and the
    same outputs up to rounding. Build one from a trained module with
    :meth:`from_multihead_attention`. Without weights to return
    (``need_weights=False``, which torch's Transformer layers pass) attention
    runs through ``F.scaled_dot_product_attention``.
    """

    # torch's TransformerEncoderLayer takes its fused inference path only for
    # an attention with a packed in_proj_bias; there is none here.
    in_proj_bias = None

    @property
    def in_proj_weight(self) -> Tensor:
        """The query projection's weight, for torch's ``nn.TransformerEncoder``
        only: it reads its first layer's ``in_proj_weight`` (its device, its
        ``requires_grad``) to decide whether to pack a padded batch into a
        nested tensor, which ``forward`` takes. The projections themselves are
        ``q_proj``, ``k_proj`` and ``v_proj``.

        Where gradients are on and that weight is frozen, an empty tensor that
        requires grad instead: the encoder then asks ``in_proj_bias``, None
        here, whether it requires grad, and fails; the answer it is given
        ("something requires grad") keeps it on its ordinary path, as
        gradients are on."""
        weight = self.q_proj.weight
        if torch.is_grad_enabled() and not weight.requires_grad:
            return torch.empty(0, device=weight.device, dtype=weight.dtype, requires_grad=True)
        return weight

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"SplitMultiheadAttention: embed_dim ({embed_dim}) must be a "
                             f"positive multiple of num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        # The projections are made without a random draw of their own and
        # out_proj with nn.Linear's, as torch makes its packed in_proj_weight
        # and out_proj: with _reset_parameters, the same draws in the same
        # order, so a seed gives nn.MultiheadAttention's weights and leaves the
        # random stream where it would (later layers, data order).
        home = torch.empty(0, device=device).device  # a default-device context included
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(fan_in, embed_dim, bias=bias, device="meta", dtype=dtype).to_empty(
                device=home)
            for fan_in in (embed_dim, self.kdim, self.vdim))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self):
        """Draw the weights as ``nn.MultiheadAttention`` does: Xavier-uniform over
        the packed (3·embed_dim, embed_dim) projection (over each one where
        kdim or vdim differ), zero biases, Xavier-normal ``bias_k``/``bias_v``;
        ``out_proj.weight`` keeps ``nn.Linear``'s draw, as torch's does."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self._qkv_same_embed_dim:
            # One draw over the packed (3·embed_dim, embed_dim) matrix, as torch's.
            weight = self.q_proj.weight
            packed = torch.empty(3 * self.embed_dim, self.embed_dim, device=weight.device,
                                 dtype=weight.dtype)
            nn.init.xavier_uniform_(packed)
            for layer, rows in zip(projections, packed.chunk(3)):
                layer.weight.copy_(rows)
        else:
            for layer in projections:
                nn.init.xavier_uniform_(layer.weight)
        for layer in (*projections, self.out_proj):
            if layer.bias is not None:
                layer.bias.zero_()
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """A module computing what ``mha`` computes, with copies of its weights,
        its ``requires_grad`` flags, device, dtype and training mode.

        ``mha`` must be an ``nn.MultiheadAttention`` itself: a subclass may
        compute otherwise than with the weights copied here (torch's
        quantizable one projects with layers of its own)."""
        owner = "SplitMultiheadAttention.from_multihead_attention"
        if _parametrized_attention(mha):
            _check_not_parametrized(mha, "mha", owner)
        if type(mha) is not nn.MultiheadAttention:
            raise TypeError(f"{owner}: mha must be an nn.MultiheadAttention (not a subclass, "
                            f"which may compute otherwise), got {type(mha).__name__}")
        if instance_forward(mha):
            raise TypeError(f"{owner}: mha is {INSTANCE_FORWARD_WHY}")
        _check_not_parametrized(mha, "mha", owner)
        return _build(cls, mha, {})

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        for label, t in (("query", query), ("key", key), ("value", value),
                         ("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if not (isinstance(t, Tensor) or (t is None and label.endswith("mask"))):
                raise TypeError(f"SplitMultiheadAttention: {label} must be a Tensor"
                                f"{' or None' if label.endswith('mask') else ''}, got "
                                f"{type(t).__name__}")
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, need_weights,
                                        attn_mask, average_attn_weights, is_causal)
        with _torch_asserts_as_errors():
            batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                         self.num_heads)
        fused_layout = batched and self._torch_fast_path(query, key, value, attn_mask,
                                                         key_padding_mask)
        # Work in (batch, sequence, features) whatever the layout given.
        if not batched:
            query, key, value = _each_once(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = _each_once(lambda t: t.transpose(0, 1), query, key, value)
        N, L, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim:
            raise RuntimeError(f"SplitMultiheadAttention: expected embedding dimension "
                               f"{self.embed_dim}, got {E}")
        if key.shape[-1] != self.kdim:
            raise RuntimeError(f"SplitMultiheadAttention: expected key feature size (kdim) "
                               f"{self.kdim}, got {key.shape[-1]}")
        if value.shape[-1] != self.vdim:
            raise RuntimeError(f"SplitMultiheadAttention: expected value feature size (vdim) "
                               f"{self.vdim}, got {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2]:
            raise RuntimeError(f"SplitMultiheadAttention: key's batch and sequence sizes "
                               f"{tuple(key.shape[:2])} differ from value's "
                               f"{tuple(value.shape[:2])}")
        if key.shape[0] != N:
            raise RuntimeError(f"SplitMultiheadAttention: key and value hold {key.shape[0]} "
                               f"sequences, query {N}")

        # Masks as torch's MultiheadAttention reads them: boolean ones become
        # -inf where True; is_causal is only a hint that attn_mask is causal.
        with _torch_asserts_as_errors():
            key_padding_mask = F._canonical_mask(
                mask=key_padding_mask, mask_name="key_padding_mask",
                other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("SplitMultiheadAttention: is_causal needs attn_mask (the causal "
                               "mask itself), as nn.MultiheadAttention does")
        # Checked (and made additive) even where the causal kernel will not
        # read it, as torch checks it: a mask of integers is refused either way.
        with _torch_asserts_as_errors():
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask",
                                          other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the fused causal kernel takes it from here
        else:
            is_causal = False
        H, D = self.num_heads, self.head_dim
        if attn_mask is not None:
            expected = (L, S) if attn_mask.dim() == 2 else (N * H, L, S)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"SplitMultiheadAttention: attn_mask has shape "
                                   f"{tuple(attn_mask.shape)}, expected {expected}")
            attn_mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else \
                attn_mask.view(N, H, L, S)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise RuntimeError(f"SplitMultiheadAttention: key_padding_mask has shape "
                                   f"{tuple(key_padding_mask.shape)}, expected {(N, S)}")
            key_padding_mask = key_padding_mask.view(N, 1, 1, S)

        q = self.q_proj(query).view(N, L, H, D).transpose(1, 2)
        k, v = self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
        k = k.view(N, k.shape[1], H, D).transpose(1, 2)
        v = v.view(N, v.shape[1], H, D).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(N, H, 1, D)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        # Key positions appended after the sequence are never masked (F.pad
        # with zeros, as torch does).
        appended = k.shape[2] - S
        if appended:
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, appended))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, appended))
        mask = attn_mask
        if key_padding_mask is not None:
            mask = key_padding_mask if mask is None else mask + key_padding_mask
        dropout = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            # Batched products over (batch·heads), the mask added inside the
            # product as torch does, so that autocast casts it with the product
            # and a mask of another dtype is refused the same way.
            T = k.shape[2]
            scaled = (q * (1.0 / math.sqrt(D))).reshape(N * H, L, D)
            keys = k.reshape(N * H, T, D).transpose(1, 2)
            if mask is None:
                scores = torch.bmm(scaled, keys)
            else:
                scores = torch.baddbmm(mask.expand(N, H, L, T).reshape(N * H, L, T), scaled,
                                       keys)
            probabilities = torch.softmax(scores, dim=-1).view(N, H, L, T)
            if dropout > 0.0:
                probabilities = F.dropout(probabilities, p=dropout)
            out = torch.matmul(probabilities, v)
            weights = probabilities.mean(dim=1) if average_attn_weights else probabilities
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if fused_layout:  # (N, L, E) in memory, as torch's fused kernel returns it
            return out, weights
        # Laid out as torch's: (L, N, E) in memory, a transposed view of it
        # where batch_first. Code after it may view() it, and a dropout after
        # it (a Transformer layer's) draws its mask in memory order, so that
        # another layout drew other masks from the same seed.
        out = out.transpose(0, 1).contiguous()
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _torch_fast_path(self, query, key, value, attn_mask, key_padding_mask):
        """Whether nn.MultiheadAttention would run these batched inputs through
        its fused inference kernel, whose output is a contiguous (N, L, E)
        tensor: its conditions, read for the module this one stands for (the
        projections' parameters for its packed ones). The masks as given: the
        kernel takes boolean ones only."""
        if any(mask is not None and torch.is_floating_point(mask)
               for mask in (attn_mask, key_padding_mask)):
            return False
        parameters = list(self.parameters())
        if not (torch.backends.mha.get_fastpath_enabled() and query is key is value
                and self.batch_first and not self.training and self.num_heads % 2 == 0
                and self.bias_k is None and not self.add_zero_attn
                and self._qkv_same_embed_dim and self.q_proj.bias is not None
                and not torch.is_autocast_enabled()
                and all(query.dtype == p.dtype for p in parameters)):
            return False
        tensors = [query, *parameters]
        if torch.overrides.has_torch_function(tensors) or any(
                t.device.type not in ("cpu", "cuda", "privateuseone") for t in tensors):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def _nested_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal):
        """Self-attention over a nested tensor's sequences, as nn.MultiheadAttention's
        fast path computes it (torch's TransformerEncoder passes one): the
        sequences padded into a batch whose padding is masked, the output
        nested again with their lengths, attention weights padded with zeros."""
        # nn.MultiheadAttention takes a nested tensor only for self-attention,
        # without masks, batch first; elsewhere what it means is not defined.
        if query is not key or key is not value:
            raise RuntimeError("SplitMultiheadAttention: a nested-tensor query, key or value "
                               "is only taken for self-attention (query, key and value the "
                               "same tensor), as nn.MultiheadAttention does")
        if not self.batch_first:
            raise RuntimeError("SplitMultiheadAttention: a nested-tensor query needs "
                               "batch_first=True (its sequences are the batch)")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise RuntimeError("SplitMultiheadAttention: a nested-tensor query takes no "
                               "key_padding_mask, attn_mask or is_causal (its sequences have "
                               "their own lengths), as nn.MultiheadAttention does")
        if query.layout is not torch.strided:
            raise RuntimeError(f"SplitMultiheadAttention: a nested-tensor query must have "
                               f"the torch.strided layout (nn.MultiheadAttention takes no "
                               f"other), got {query.layout}")
        if query.dim() != 3:
            raise RuntimeError(f"SplitMultiheadAttention: a nested-tensor query must hold "
                               f"(sequence, features) tensors, got {query.dim() - 1}-d ones")
        lengths = [t.shape[0] for t in query.unbind()]
        padded = torch.nested.to_padded_tensor(query, 0.0)
        padding = torch.arange(padded.shape[1], device=padded.device) >= \
            torch.tensor(lengths, device=padded.device).unsqueeze(1)
        out, weights = self.forward(padded, padded, padded, key_padding_mask=padding,
                                    need_weights=need_weights,
                                    average_attn_weights=average_attn_weights)
        out = torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths)])
        if weights is not None:  # padded queries have none, as torch gives them
            rows = padding.unsqueeze(-1)
            weights = weights.masked_fill(rows if weights.dim() == 3 else rows.unsqueeze(1), 0.0)
        return out, weights


@contextlib.contextmanager
def _torch_asserts_as_errors():
    """torch's shape and mask checks for attention (shared with
    nn.MultiheadAttention) assert; their messages name the argument and what
    was seen, and here they are a RuntimeError, as this module's own checks."""
    try:
        yield
    except AssertionError as exc:
        raise RuntimeError(f"SplitMultiheadAttention: {exc}") from None


# The tensors of an nn.MultiheadAttention that a split copies (out_proj aside).
_MHA_TENSORS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                "in_proj_bias", "bias_k", "bias_v")


def _parametrized_attention(m):
    """Whether ``m`` is an nn.MultiheadAttention that torch made a subclass of
    only to parametrize its tensors (refused with that reason, not as a subclass)."""
    return parametrize.is_parametrized(m) and type(m).__mro__[1] is nn.MultiheadAttention


def _check_not_parametrized(mha, name, owner):
    """A TypeError for an attention module with a parametrization (on its own
    tensors or its out_proj's): the split layers would hold the values it
    computes now, without the constraint (orthogonality, a spectral norm)
    that computes them at every use."""
    held = [f"{where}{tensor}" for where, m in (("", mha), ("out_proj.", mha.out_proj))
            if parametrize.is_parametrized(m) for tensor in m.parametrizations]
    if held:
        raise TypeError(
            f"{owner}: {name or 'the model'} has parametrized tensors ({', '.join(held)}; "
            "torch.nn.utils.parametrize), which split layers would hold as fixed values, "
            "without the parametrization; torch.nn.utils.parametrize.remove_parametrizations "
            "makes them plain tensors first")
    # torch's older hooks (pruning, weight_norm, spectral_norm) recompute a
    # tensor from others before every call: the same, and their mask or
    # factors would leave the state dict.
    for where, m, tensors in (("", mha, _MHA_TENSORS), ("out_proj's", mha.out_proj,
                                                         ("weight", "bias"))):
        why = weight_recomputed(m, tensors)
        if why:
            whose = f"{name or 'the model'}{' ' + where if where else ''}"
            raise TypeError(f"{owner}: {whose} cannot be split: {why.replace('its ', '', 1)}; "
                            "split layers would hold its current values, without the hook")


def _each_once(change, *tensors):
    """``change`` applied to each tensor, once for a tensor passed several times
    (as torch does): self-attention's q, k and v projections then see one
    tensor, so that calibration computes its XᵀX once for the three."""
    changed = {}
    for t in tensors:
        if id(t) not in changed:
            changed[id(t)] = change(t)
    return [changed[id(t)] for t in tensors]


def _build(cls, mha, copies):
    """A ``cls`` holding copies of ``mha``'s tensors (see _copy for ``copies``)."""
    E = mha.embed_dim
    with torch.device("meta"):  # no random init: every tensor is set below
        # Built without biases: each layer gets one only where mha has it
        # (out_proj's may be there without in_proj_bias, or the other way).
        new = cls(E, mha.num_heads, mha.dropout, bias=False,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
                  dtype=mha.out_proj.weight.dtype)
    thirds = [slice(i * E, (i + 1) * E) for i in range(3)]
    projections = (new.q_proj, new.k_proj, new.v_proj)
    if mha._qkv_same_embed_dim:
        weights = [(mha.in_proj_weight, rows) for rows in thirds]
    else:
        weights = [(w, slice(None)) for w in (mha.q_proj_weight, mha.k_proj_weight,
                                              mha.v_proj_weight)]
    for layer, (source, rows) in zip(projections, weights):
        layer.weight = _copy(source, copies, rows)
    if mha.in_proj_bias is not None:
        for layer, rows in zip(projections, thirds):
            layer.bias = _copy(mha.in_proj_bias, copies, rows)
    new.out_proj.weight = _copy(mha.out_proj.weight, copies)
    if mha.out_proj.bias is not None:
        new.out_proj.bias = _copy(mha.out_proj.bias, copies)
    if mha.bias_k is not None:
        new.bias_k, new.bias_v = _copy(mha.bias_k, copies), _copy(mha.bias_v, copies)
    return new.train(mha.training)


def _copy(tensor, copies, rows=slice(None)):
    """A parameter holding a copy of ``tensor[rows]``, with its ``requires_grad``.

    ``copies`` remembers the ones made, by tensor and rows: attention modules
    sharing a tensor (ALBERT-style ties) then share its copy, tied as before.
    """
    key = (id(tensor), rows.start, rows.stop)
    if key not in copies:
        # Outside inference mode: copies made under torch.inference_mode()
        # would be inference tensors, which the model could never train.
        with torch.inference_mode(False):
            copies[key] = nn.Parameter(tensor.detach()[rows].clone(),
                                       requires_grad=tensor.requires_grad)
    return copies[key]


@keeps_encoder_flags
def split_attention(model: nn.Module, include: str | Sequence[str] | None = None,
                    exclude: str | Sequence[str] | None = None) -> list[str]:
    """Replace the model's ``nn.MultiheadAttention`` modules by
    :class:`SplitMultiheadAttention`, in place, so that ``compress_model``
    (or ``add_lora``) reaches their projections.

    ``include`` / ``exclude`` select modules by name as in ``compress_model``.
    Subclasses of ``nn.MultiheadAttention`` are left alone, as
    ``compress_model`` leaves subclasses of ``nn.Linear``: they may compute
    otherwise (an include pattern selecting only such modules is a
    TypeError), and so are modules that ``torch.compile`` wraps on their own
    (the compiled wrapper would go on calling the original); a compiled model
    is split in the module it compiled. A module registered under several
    names is replaced everywhere by one new module (a pattern may select it
    by any of them), and modules sharing a tensor (ALBERT-style ties) share
    its new projections; a tensor shared with a module not split with them
    is a ValueError, and a module with a parametrization (on its own tensors
    or its ``out_proj``'s) or torch's older pruning, weight_norm or
    spectral_norm hooks a TypeError: the split layers would hold their
    values fixed. If anything fails (a KeyboardInterrupt too) the model is
    left as it was. Outputs are unchanged (up to rounding), except
    where torch's ``nn.TransformerEncoder`` would have packed a padded batch
    into a nested tensor: it is kept on its ordinary path, which leaves values
    computed at the padded positions where the nested one left zeros (real
    positions are the same). Returns the names replaced. ``load_compressed``
    splits them by itself where a compressed file holds split projections.
    """
    from .selection import as_patterns, select_names

    if not isinstance(model, nn.Module):
        raise TypeError(f"split_attention: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    refuse_distributed_wrapper(model, "split_attention")
    model = compiled_original(model)
    if type(model) is nn.MultiheadAttention:
        raise TypeError("split_attention: the model is itself an nn.MultiheadAttention; use "
                        "SplitMultiheadAttention.from_multihead_attention(model) instead")
    compiled = compiled_alone(model)
    found, left_alone = {}, {}
    for name, m in model.named_modules():
        if id(m) in compiled and isinstance(m, nn.MultiheadAttention):
            left_alone[name] = COMPILED_ALONE_WHY
        elif isinstance(m, nn.MultiheadAttention) and instance_forward(m):
            left_alone[name] = INSTANCE_FORWARD_WHY
        elif type(m) is nn.MultiheadAttention or _parametrized_attention(m):
            found[name] = m  # a parametrized one is refused below, naming that
        elif isinstance(m, nn.MultiheadAttention):
            left_alone[name] = (
                f"{type(m).__name__}, a subclass of nn.MultiheadAttention, left alone as "
                "compress_model leaves subclasses of nn.Linear: its forward may compute "
                "otherwise than with the packed weights")
    if not found:
        split = [name or "the model" for name, m in model.named_modules()
                 if isinstance(m, SplitMultiheadAttention)]
        raise ValueError(
            "split_attention: the model has no nn.MultiheadAttention module"
            + (f" to split (left alone: {_listed(left_alone)})" if left_alone else "")
            + (f"; its attention is split already: {preview(split)}" if split else ""))
    places = places_of(model)
    names = select_names(list(found) + list(left_alone),
                         as_patterns("include", include, "split_attention"),
                         as_patterns("exclude", exclude, "split_attention"),
                         owner="split_attention", what="nn.MultiheadAttention module",
                         aliases={name: places[id(m)] for name, m in found.items()},
                         left_alone=left_alone)
    names = [name for name in names if name in found]
    modules = [found[name] for name in names]
    for name, m in zip(names, modules):
        _check_not_parametrized(m, name, "split_attention")
    swaps = Swaps(model)
    try:
        _split(model, modules, "split_attention", swaps)
    except BaseException:  # a KeyboardInterrupt too
        swaps.undo()
        raise
    return names


def _listed(why):
    """``name (why)`` for each of ``{name: why}``, shortened."""
    return preview(f"{name or 'the model'} ({text})" for name, text in why.items())


def _split(model, modules, owner, swaps):
    """Put a SplitMultiheadAttention in every place each of ``modules`` sits,
    all built before the model changes, through ``swaps`` (a Swaps of
    ``model``, whose undo takes them back)."""
    if not modules:  # load_compressed asks for every model it loads
        return
    places = places_of(model)
    _check_ties_kept(model, modules, places, owner)
    copies = {}  # shared by all: a tensor several modules hold gets one copy
    new = [_build(SplitMultiheadAttention, m, copies) for m in modules]
    for mha, split in zip(modules, new):
        for place in places[id(mha)]:
            swaps.swap(place, split)


def _check_ties_kept(model, modules, places, owner):
    """A ValueError when a tensor of ``modules`` is also held by a module not
    split with them: it would keep the old tensor, the split ones a copy."""
    tensors, inside = {}, set()
    for m in modules:
        for place in places[id(m)]:
            inside.update((place, f"{place}.out_proj"))
        first = places[id(m)][0]
        for pname, p in m.named_parameters(remove_duplicate=False):
            tensors.setdefault(id(p), f"{first}.{pname}")
    for path, module in model.named_modules(remove_duplicate=False):
        # The modules' own tensors, also below their out_proj (a parametrization's).
        if path in inside or any(path.startswith(f"{place}.") for place in inside):
            continue
        for pname, p in module._parameters.items():
            if p is not None and id(p) in tensors:
                holder = f"{path}.{pname}" if path else pname
                raise ValueError(
                    f"{owner}: {tensors[id(p)]} is tied to {holder}, which is not split with "
                    "it; splitting would copy the tensor and untie them (split the modules "
                    "sharing it together, or untie them first)")


# Why an attention module with a forward set on the instance (accelerate's
# hooks for device_map and offloading) is not split.
INSTANCE_FORWARD_WHY = ("an nn.MultiheadAttention with a forward set on the instance, which a "
                        "SplitMultiheadAttention in its place would never run (remove it first; "
                        "accelerate: remove_hook_from_module)")


def split_where_stored_split(model: nn.Module, keys, swaps: Swaps) -> None:
    """Split each ``nn.MultiheadAttention`` of ``model`` whose tensors ``keys``
    (a file's) hold as separate projections (``<name>.q_proj.…``) rather than
    packed (``<name>.in_proj_weight``), through ``swaps`` (whose undo puts
    them back). Subclasses are never split (see :func:`split_attention`)."""
    keys = set(keys)

    def stored_split(name):
        prefix = f"{name}." if name else ""
        return f"{prefix}in_proj_weight" not in keys and \
            any(k.startswith(f"{prefix}q_proj.") for k in keys)

    if type(model) is nn.MultiheadAttention and stored_split(""):
        # A module cannot replace itself in place.
        raise ValueError(
            "load_compressed: the file holds a SplitMultiheadAttention (q_proj, k_proj, v_proj "
            "and out_proj), but the model is an nn.MultiheadAttention, which cannot become one "
            "in place; load into SplitMultiheadAttention.from_multihead_attention(model) "
            "instead")
    attention = [(name, m) for name, m in model.named_modules()
                 if type(m) is nn.MultiheadAttention and name]
    chosen = [m for name, m in attention if stored_split(name)]
    hooked = [name for name, m in attention if m in chosen and instance_forward(m)]
    if hooked:
        raise ValueError(f"load_compressed: the file holds {preview(hooked)} split, but the "
                         f"model's is {INSTANCE_FORWARD_WHY}")
    # A file stores a tensor shared by several modules once, under one name:
    # a module whose tensors are all tied to a split one has no keys of its
    # own. It was split with them (split_attention keeps ties), so it is here.
    shared = {id(p) for m in chosen for p in m.parameters()}
    grown = True
    while grown:
        grown = False
        for name, m in attention:
            if (m not in chosen and f"{name}.in_proj_weight" not in keys
                    and any(id(p) in shared for p in m.parameters())):
                chosen.append(m)
                shared.update(id(p) for p in m.parameters())
                grown = True
    for m in chosen:
        _check_not_parametrized(m, next(name for name, a in attention if a is m),
                                "load_compressed")
    _split(model, chosen, "load_compressed", swaps)
