"""Small lowrank_linear calls through every CUDA path, for compute-sanitizer.

Shapes have tails in every dimension, aligned and misaligned layouts, with and
without bias, so each kernel's bounds checks are exercised. Exits non-zero on
a wrong result.
"""

import sys

import torch

import lowrank_ext  # noqa: F401  (registers the ops)

path_op = torch.ops.lowrank_ext_internal.lowrank_linear_cuda_path


def reference(x, A, B, bias):
    y = (x.double() @ A.double().T) @ B.double().T
    return y if bias is None else y + bias.double()


def main():
    torch.manual_seed(0)
    failures = 0
    shapes = [(1, 72, 8, 40), (5, 130, 24, 70), (70, 77, 33, 65), (129, 64, 256, 128)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for path in ("tensor_core", "split_k", "cublas"):
            if path == "tensor_core" and dtype not in (torch.float16, torch.bfloat16):
                continue
            for M, k, r, d in shapes:
                for misaligned in (False, True):
                    base = torch.randn(M * k + 1, device="cuda", dtype=dtype)
                    x = base[int(misaligned):int(misaligned) + M * k].view(M, k)
                    A = torch.randn(r, k, device="cuda", dtype=dtype) / k ** 0.5
                    B = torch.randn(d, r, device="cuda", dtype=dtype) / r ** 0.5
                    bias = torch.randn(d, device="cuda", dtype=dtype) if M % 2 else None
                    y, t = path_op(x, A, B, bias, path)
                    torch.cuda.synchronize()
                    err = (y.double() - reference(x, A, B, bias)).abs().max().item()
                    tol = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
                    if not err <= tol:
                        failures += 1
                        print(f"FAIL {path} {dtype} {(M, k, r, d)} misaligned={misaligned}: "
                              f"max error {err}")
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
