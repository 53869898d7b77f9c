"""Independent float64 references: the dense W = B·A the ops avoid forming."""

import torch


def lowrank_reference(x, A, B, bias=None):
    W = B.double() @ A.double()
    y = x.double() @ W.T
    return y if bias is None else y + bias.double()


def lora_reference(x, W, A, B, bias=None, scale=1.0):
    W_eff = W.double() + scale * (B.double() @ A.double())
    y = x.double() @ W_eff.T
    return y if bias is None else y + bias.double()


def assert_close_to_reference(out, ref, dtype, scale=None):
    """Compare with a float64 reference, tolerances per dtype, relative to the output's size."""
    from conftest import TOLERANCES

    tol = TOLERANCES[dtype]
    if scale is None:
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    assert out.dtype == dtype
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
