"""Run by test_packaging in a subprocess against a build made with
LOWRANK_EXT_PORTABLE=1 (no x86 micro-kernels, as on aarch64): every path of
the CPU ops there matches a float64 reference, forward and backward."""

import sys

import torch

import lowrank_ext as lx
from reference import assert_close_to_reference, lora_reference, lowrank_reference

assert lx.__file__.startswith(sys.argv[1]), lx.__file__
assert lx.backend_info()["compiled"], lx.backend_info()
for choice in ("", "auto", "avx2", "portable"):
    assert torch.ops.lowrank_ext._cpu_kernel(choice) == "portable", choice
assert lx.backend_info()["cpu_kernels"] == "portable"

torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    # Decode-sized, few-row and blocked row counts; ranks past a tile.
    for M, k, r, d in ((1, 37, 3, 29), (3, 67, 5, 45), (64, 40, 17, 33), (300, 33, 8, 70)):
        x = torch.randn(M, k).to(dtype).requires_grad_()
        W = (torch.randn(d, k) * k ** -0.5).to(dtype).requires_grad_()
        A = (torch.randn(r, k) * k ** -0.5).to(dtype).requires_grad_()
        B = (torch.randn(d, r) * r ** -0.5).to(dtype).requires_grad_()
        b = torch.randn(d).to(dtype).requires_grad_()
        for y, ref, inputs in (
                (lx.lowrank_linear(x, A, B, b), lowrank_reference(x, A, B, b), (x, A, B, b)),
                (lx.lora_linear(x, W, A, B, b, 0.7), lora_reference(x, W, A, B, b, 0.7),
                 (x, W, A, B, b))):
            assert_close_to_reference(y, ref, dtype)
            gy = torch.randn_like(ref)
            grads = torch.autograd.grad(y, inputs, gy.to(dtype))
            leaves = [t.detach().double().requires_grad_() for t in inputs]
            expected = torch.autograd.grad(
                (lowrank_reference if len(inputs) == 4 else
                 lambda x, W, A, B, b: lora_reference(x, W, A, B, b, 0.7))(*leaves),
                leaves, gy)
            for got, want in zip(grads, expected):
                assert_close_to_reference(got, want, dtype)
print("portable build: ok")
