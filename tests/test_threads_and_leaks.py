"""Many calls leave memory flat; concurrent Python threads get correct results."""

import threading

import pytest
import torch

import lowrank_ext as lx
from reference import lora_reference, lowrank_reference


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
def test_ten_thousand_calls_leave_resident_memory_flat(op):
    x = torch.randn(8, 32)
    W, A, B, b = torch.randn(24, 32), torch.randn(4, 32), torch.randn(24, 4), torch.randn(24)
    params = [t.requires_grad_() for t in ((W, A, B, b) if op == "lora_linear" else (A, B, b))]

    def step():
        if op == "lowrank_linear":
            y = lx.lowrank_linear(x, A, B, b)
        else:
            y = lx.lora_linear(x, W, A, B, b, 0.5)
        y.sum().backward()

    for _ in range(1000):  # warm up allocator caches and lazy initialisation
        step()
    before = _rss_bytes()
    for _ in range(10_000):
        step()
    growth = _rss_bytes() - before
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"
    for p in params:
        assert torch.isfinite(p.grad).all()


def test_threads_calling_the_ops_at_once_get_correct_results():
    problems = []
    for i in range(6):
        g = torch.Generator().manual_seed(i)
        M, k, r, d = 30 + i, 64 + 7 * i, 1 + i, 48 + 5 * i
        x, W = torch.randn(M, k, generator=g), torch.randn(d, k, generator=g)
        A, B, b = torch.randn(r, k, generator=g), torch.randn(d, r, generator=g), torch.randn(d, generator=g)
        problems.append((x, W, A, B, b, lowrank_reference(x, A, B, b).float(),
                         lora_reference(x, W, A, B, b, 0.25).float()))
    errors = []
    barrier = threading.Barrier(len(problems))

    def worker(problem):
        x, W, A, B, b, ref_lr, ref_lora = problem
        try:
            barrier.wait()
            for _ in range(200):
                torch.testing.assert_close(lx.lowrank_linear(x, A, B, b), ref_lr, rtol=1e-4, atol=1e-3)
                torch.testing.assert_close(lx.lora_linear(x, W, A, B, b, 0.25), ref_lora,
                                           rtol=1e-4, atol=1e-3)
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[0]


@pytest.mark.skipif(not lx.backend_info()["compiled"], reason="kernel sets are the compiled backend's")
def test_switching_cpu_kernels_while_another_thread_calls_the_ops():
    # lora_linear's few-rows branch asked twice whether the AVX2 kernels were
    # on: switched off in between (by another thread), it ran an undefined
    # x·Aᵀ into addmm and raised "mat1 and mat2 must have the same dtype".
    import time

    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(4, 64, generator=g), torch.randn(24, 64, generator=g)
    A, B = torch.randn(3, 64, generator=g), torch.randn(24, 3, generator=g)
    want = lora_reference(x, W, A, B, None, 0.5).float()
    previous = torch.ops.lowrank_ext._cpu_kernel("")
    stop = threading.Event()

    def switch():
        while not stop.is_set():
            for choice in ("portable", "auto"):
                torch.ops.lowrank_ext._cpu_kernel(choice)

    switcher = threading.Thread(target=switch)
    switcher.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for _ in range(200):
                torch.testing.assert_close(lx.lora_linear(x, W, A, B, None, 0.5), want,
                                           rtol=1e-4, atol=1e-4)
    finally:
        stop.set()
        switcher.join()
        torch.ops.lowrank_ext._cpu_kernel({"avx512bf16": "auto"}.get(previous, previous))
