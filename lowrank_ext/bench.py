"""Measurement library behind ``python -m lowrank_ext bench``.

Every side of a comparison runs in the same process, with the same thread
count, the same allocator (each call allocates its own output) and the same
warmup; sides are interleaved round by round (A B C D, A B C D, ...) so that
load from other processes spreads over all of them, and medians are reported.

Sides, per shape (M, k, r, d), for the op "lowrank":
  ours      lowrank_ext.lowrank_linear(x, A, B, bias)
  compose   F.linear(F.linear(x, A), B, bias)
  compiled  the same composition under torch.compile (the stronger baseline)
  dense     F.linear(x, W, bias) with W = B·A formed once, outside the timing

and for the op "lora" (a frozen d × k layer W plus an adapter of rank r):
  ours      lowrank_ext.lora_linear(x, W, A, B, bias, scale)
  compose   F.linear(x, W, bias) + scale·F.linear(F.linear(x, A), B), peft's
            unmerged forward
  compiled  that composition under torch.compile
  dense     F.linear(x, W + scale·B·A, bias): the adapter merged (fwd only)

and for the op "dora" (the same layer and adapter with DoRA's magnitude m):
  ours      the DoRA forward LoRALinear(use_dora=True) runs (lora_layer.dora_forward,
            called directly: not the module call around it): lora_linear
            rescaled by m / ‖W + scale·B·A‖ (the norm a block of rows at a time)
  compose   peft's DoRA forward: F.linear(x, W, bias), the norm of
            W + scale·B·A formed whole, (m/‖·‖ − 1)·x·Wᵀ + m/‖·‖·scale·lora(x)
            (B·A as a product, where peft forms lora_B(lora_A(I)): no slower
            than peft's own)
  compiled  that composition under torch.compile
  dense     F.linear(x, m/‖·‖ ⊙ (W + scale·B·A), bias): merged (fwd only)

Modes: "fwd" (inference, no autograd) and "train" (forward + backward with
respect to x, A, B and bias; the dense side trains W itself; for "lora", with
respect to x, A and B, W and bias staying frozen as in LoRA fine-tuning; for
"dora", also the magnitude).
"""

import contextlib
import itertools
import math
import numbers
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ._names import first_line

SIDES = ("ours", "compose", "compiled", "dense")
MODES = ("fwd", "train")
OPS = ("lowrank", "lora", "dora")
ADAPTER_OPS = ("lora", "dora")
# The adapter's scale (alpha / r) in the "lora" runs.
LORA_SCALE = 2.0
BASELINES = ("compose", "compiled", "dense")

# (M, k, r, d). The first is the shape of the demo's seed layer.
DEFAULT_CPU_SHAPES = ((1, 10, 2, 10), (1, 4096, 16, 4096), (16, 4096, 64, 4096),
                      (2048, 4096, 64, 4096))
DEFAULT_CPU_DTYPES = ("float32", "bfloat16")
# LoRA on a 4096 × 4096 layer: decode-sized batches, where the fused op reads
# W once, and a prefill-sized one, where the dense product dominates.
DEFAULT_CPU_LORA_SHAPES = ((1, 4096, 16, 4096), (4, 4096, 16, 4096), (16, 4096, 16, 4096),
                           (64, 4096, 16, 4096), (512, 4096, 16, 4096))
DEFAULT_CUDA_LORA_SHAPES = ((1, 4096, 16, 4096), (16, 4096, 16, 4096), (8192, 4096, 16, 4096))
DEFAULT_CUDA_SHAPES = ((1, 4096, 16, 4096), (16, 4096, 64, 4096), (8192, 4096, 64, 4096),
                       (8192, 8192, 256, 8192))
DEFAULT_CUDA_DTYPES = ("bfloat16",)
# The one fp32 shape of the default GPU run.
DEFAULT_CUDA_FP32_SHAPES = ((8192, 4096, 64, 4096),)

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
          "bf16": torch.bfloat16}

# Inputs are rotated over copies until one round of them exceeds this many
# bytes, so that small shapes are not timed on data left hot in cache by the
# previous call. CPU: beyond the 32 MB last-level cache; GPU: beyond a 50 MB L2.
# At most MAX_COPIES copies: sets of a few KB (the seed shape) stay in cache,
# on every side alike. All sides share one position in the copies (see
# build_calls' rotate_to).
CPU_ROTATE_BYTES = 64 << 20
CUDA_ROTATE_BYTES = 128 << 20
MAX_COPIES = 256
# Calls below this many microseconds are captured in CUDA graphs (every side).
CUDA_GRAPH_BELOW_US = 200.0


# More torch threads than this is no benchmark setting: OpenMP fails to make
# them (16384) or the process crashes (100000).
MAX_THREADS = max(1024, os.cpu_count() or 1)


# Bounds on the timing settings: an hour of warm-up per side, a minute per
# timed sample.
MAX_WARMUP_S = 3600.0
MAX_BATCH_MS = 60000.0


def parse_shapes(text):
    """"M,k,r,d;M,k,r,d" (or "MxkxRxd" items) -> list of 4-tuples of ints."""
    shapes = []
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        # Spaces around a separator only: "1,4,2,4 5" is no (1, 4, 2, 45).
        parts = [p.strip() for p in item.replace("x", ",").split(",")]
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError(f"bad shape {item!r}: expected M,k,r,d (four integers)")
        shape = tuple(int(p) for p in parts)
        if min(shape) < 1:
            raise ValueError(f"bad shape {item!r}: M, k, r and d must be at least 1 (an empty "
                             "product has nothing to time)")
        shapes.append(shape)
    if not shapes:
        raise ValueError("no shapes given")
    # Each shape once ("4,8,2,8;4x8x2x8" would time the same problem twice).
    return list(dict.fromkeys(shapes))


def parse_dtypes(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no dtypes given in {text!r}")
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    # Each dtype once ("float32,fp32" would time every problem twice).
    return list(dict.fromkeys(str(DTYPES[n]).replace("torch.", "") for n in names))


def _cpuinfo(key):
    """The value of the first /proc/cpuinfo line for `key`, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model():
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_vector_flags():
    """The CPU's vector extensions (AVX, FMA, F16C, AMX families)."""
    flags = _cpuinfo("flags")
    if flags is None:
        return None
    return sorted(f for f in flags.split() if f.startswith(("avx", "fma", "f16c", "amx")))


def _blas_info():
    import re

    config = torch.__config__.show()
    keys = ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP")
    found = dict(re.findall(r"\b(" + "|".join(keys) + r")=([^,\s]+)", config))
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    if onednn:
        found["oneDNN"] = onednn.group(1)
    return found


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_info(device):
    """What the numbers depend on: hardware, threads, torch and its libraries."""
    from . import backend_info

    info = {
        "cpu_model": _cpu_model(),
        "cpu_vector_flags": _cpu_vector_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_blas": _blas_info(),
        "mkl_available": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "lowrank_ext": backend_info(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda_version=torch.version.cuda,
                    gpu_capability=f"{props.major}.{props.minor}",
                    # What float32 products may use: cuBLAS follows these.
                    allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


# ----------------------------------------------------------------------------- sides

def _composition(x, A, B, bias):
    return F.linear(F.linear(x, A), B, bias)


def _lora_composition(x, W, A, B, bias):
    return F.linear(x, W, bias) + LORA_SCALE * F.linear(F.linear(x, A), B)


def _dora_norms(W, A, B):
    """peft's weight norm: W + scale·B·A formed whole, detached."""
    return torch.linalg.norm(W + LORA_SCALE * (B @ A), dim=1).detach()


def _dora_composition(x, W, A, B, bias, magnitude):
    # peft's DoRA layer: the base result, then the rescaled base and adapter.
    result = F.linear(x, W, bias)
    base = result if bias is None else result - bias
    factor = magnitude / _dora_norms(W, A, B)
    return result + (factor - 1) * base + factor * (LORA_SCALE * F.linear(F.linear(x, A), B))


def _dora_ours(x, W, A, B, bias, magnitude):
    from .lora_layer import dora_forward

    return dora_forward(x, W, A, B, bias, magnitude, LORA_SCALE)


def _make_inputs(shape, dtype, device, copies, train, gen):
    M, k, r, d = shape
    sets = []
    for _ in range(copies):
        sets.append(dict(
            x=torch.randn(M, k, generator=gen).to(device, dtype),
            A=(torch.randn(r, k, generator=gen) * k ** -0.5).to(device, dtype),
            B=(torch.randn(d, r, generator=gen) * max(r, 1) ** -0.5).to(device, dtype),
            bias=torch.randn(d, generator=gen).to(device, dtype),
            gy=torch.randn(M, d, generator=gen).to(device, dtype) if train else None))
    return sets


def _share_weights(sets, shape, dtype, device, key, make):
    """Give every set a (d × k) weight under ``key``; W alone is large, so fewer
    copies rotate (enough to exceed the cache on their own)."""
    M, k, r, d = shape
    n_w = min(len(sets), copies_for(d * k * _element_size(dtype), device))
    for i, s in enumerate(sets):
        s[key] = sets[i % n_w].get(key)
        if s[key] is None:
            s[key] = make(s)


def _element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _set_bytes(shape, dtype, op="lowrank"):
    M, k, r, d = shape
    dense = d * k if op in ADAPTER_OPS else 0
    magnitude = d if op == "dora" else 0
    return (M * k + r * k + d * r + d + M * d + dense + magnitude) * _element_size(dtype)


def copies_for(nbytes, device):
    """How many input sets to rotate over so that one round exceeds the cache."""
    target = CUDA_ROTATE_BYTES if device == "cuda" else CPU_ROTATE_BYTES
    return int(max(1, min(MAX_COPIES, -(-target // max(nbytes, 1)))))


def sides_for(op, mode, sides):
    """The sides that apply: a merged adapter cannot be trained, so "lora" and
    "dora" have no dense side in "train"."""
    if op in ADAPTER_OPS and mode == "train":
        return [s for s in sides if s != "dense"]
    return list(sides)


def build_calls(shape, dtype, device, mode, sides, copies, seed=0, op="lowrank"):
    """side name -> zero-argument callable that runs one call on the next input set."""
    import lowrank_ext

    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    gen = torch.Generator().manual_seed(seed)
    train = mode == "train"
    sides = sides_for(op, mode, sides)
    sets = _make_inputs(shape, dtype, device, copies, train, gen)
    M, k, r, d = shape
    if op in ADAPTER_OPS:
        # The frozen layer, and for the dense side the adapter merged into it.
        _share_weights(sets, shape, dtype, device, "W", lambda s: (
            torch.randn(d, k, generator=gen) * k ** -0.5).to(device, dtype))
        for s in sets:
            merged = s["W"].double() + LORA_SCALE * (s["B"].double() @ s["A"].double())
            if op == "dora":  # the norms moved off their start, as after training
                norms = torch.linalg.norm(merged, dim=1)
                s["magnitude"] = (norms * (0.5 + torch.rand(d, generator=gen).to(
                    norms.device, norms.dtype))).to(dtype)
                merged = merged * (s["magnitude"].double() / norms).unsqueeze(1)
            if "dense" in sides:
                s["W_merged"] = merged.to(dtype)
    elif "dense" in sides:
        # The dense side's own weight W = B·A (d × k), formed outside the timing.
        _share_weights(sets, shape, dtype, device, "W",
                       lambda s: (s["B"].double() @ s["A"].double()).to(dtype))
    if train:
        trained = {"lora": ("x", "A", "B"), "dora": ("x", "A", "B", "magnitude")}.get(
            op, ("x", "A", "B", "bias", "W"))
        for s in sets:
            for name in trained:
                if s.get(name) is not None and not s[name].requires_grad:
                    s[name].requires_grad_(True)

    if op == "lora":
        impls = {"ours": lambda x, W, A, B, bias: lowrank_ext.lora_linear(
                     x, W, A, B, bias, LORA_SCALE),
                 "compose": _lora_composition}
        composition = _lora_composition
        arg_names = {"dense": ("x", "W_merged", "bias")}
        default_names = ("x", "W", "A", "B", "bias")
    elif op == "dora":
        impls = {"ours": _dora_ours, "compose": _dora_composition}
        composition = _dora_composition
        arg_names = {"dense": ("x", "W_merged", "bias")}
        default_names = ("x", "W", "A", "B", "bias", "magnitude")
    else:
        impls = {"ours": lowrank_ext.lowrank_linear, "compose": _composition}
        composition = _composition
        arg_names = {"dense": ("x", "W", "bias")}
        default_names = ("x", "A", "B", "bias")
    if "compiled" in sides:
        impls["compiled"] = torch.compile(composition, dynamic=False, fullgraph=True)
    impls["dense"] = lambda x, W, bias: F.linear(x, W, bias)

    def make(side):
        impl = impls[side]
        names = arg_names.get(side, default_names)
        # The argument tuples are built once: what is timed is the call itself,
        # not the harness picking the next input set (which would add the same
        # microseconds to every side and flatten the ratios of tiny shapes).
        prepared = [(tuple(s[n] for n in names), s["gy"]) for s in sets]
        next_set = itertools.cycle(prepared).__next__
        if train:
            def call():
                args, gy = next_set()
                wrt = tuple(a for a in args if a is not None and a.requires_grad)
                return torch.autograd.grad(impl(*args), wrt, gy)
        else:
            # Forward inputs do not require grad; run_benchmark times them
            # under one no_grad block, as inference code would run.
            def call():
                return impl(*next_set()[0])

        def rotate_to(position):
            """Continue at input set ``position`` (mod the sets): time_sides keeps one
            position for all sides, so that each sample starts on the sets used
            longest ago, whichever side used them."""
            nonlocal next_set
            start = position % len(prepared)
            next_set = itertools.cycle(prepared[start:] + prepared[:start]).__next__

        call.rotate_to = rotate_to
        return call

    return {side: make(side) for side in sides}


# ----------------------------------------------------------------------------- timing

def _time_batch_cpu(fn, n):
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t0) / n / 1e3


def _calibrate(time_batch, fn, target_us):
    """Calls per timed batch so that one batch lasts about target_us."""
    per_call = time_batch(fn, 1)
    per_call = min(per_call, time_batch(fn, 1))
    n = 1
    while n * per_call < target_us and n < 100000:
        n *= 2
    return n


def time_sides(calls, time_batch, rounds, warmup_s, batch_us, progress=None):
    """Median microseconds per call of every side, measured interleaved."""
    names = list(calls)
    for name in names:  # warm up each side (compilation, allocator, caches)
        t_end = time.perf_counter() + warmup_s
        calls[name]()
        while time.perf_counter() < t_end:
            calls[name]()
    batch = {name: _calibrate(time_batch, calls[name], batch_us) for name in names}
    samples = {name: [] for name in names}
    faults = {name: 0 for name in names}
    start = _cpu_times()
    position = 0  # of the input sets, shared by the sides (see rotate_to)
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            rotate = getattr(calls[name], "rotate_to", None)
            if rotate is not None:
                rotate(position)
            before = _minor_page_faults()
            samples[name].append(time_batch(calls[name], batch[name]))
            faults[name] += _minor_page_faults() - before
            position += batch[name]
        if progress is not None:
            progress(i + 1, rounds)
    end = _cpu_times()
    # Over all the rounds at once: the counters tick every 10 ms, and summing
    # them sample by sample would add up their rounding.
    other_load = (((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2])
                  if start[0] is not None and end[2] > start[2] else None)
    # Page faults per call tell whether a side's outputs came from freshly
    # mapped memory (a large output costs one fault per 4 KB page then) or
    # from memory the allocator reused; the timing alone cannot. The CPU time
    # of other work (other processes, the VM's steal) per second of the timed
    # rounds tells whether the sides' threads shared the cores, which a
    # steadily busy machine does to every sample alike (so their spread
    # cannot show it); None where /proc/stat is missing. One figure for the
    # rounds, recorded with every side.
    return {name: dict(median_us=statistics.median(v), min_us=min(v), max_us=max(v),
                       calls_per_sample=batch[name], samples_us=v,
                       page_faults_per_call=faults[name] / (rounds * batch[name]),
                       other_load=other_load)
            for name, v in samples.items()}


def _system_cpu_seconds():
    """CPU seconds all CPUs of the machine spent busy so far (steal included),
    from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def _minor_page_faults():
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_times():
    """(busy CPU seconds of the machine or None, CPU seconds of this process,
    wall seconds) now."""
    own = os.times()
    return _system_cpu_seconds(), own.user + own.system, time.perf_counter()


def flops(shape, mode, side, op="lowrank"):
    M, k, r, d = shape
    dense = 2 * M * k * d
    if side == "dense":
        return dense * 3 if mode == "train" else dense
    fwd = 2 * M * r * (k + d)
    # backward: gt = gy·B, gx = gt·A, gA = gtᵀ·x, gB = gyᵀ·t
    low_rank = fwd * 3 if mode == "train" else fwd
    if op in ADAPTER_OPS:  # plus x·Wᵀ, and in training gx's gy·W (W is frozen)
        total = low_rank + (dense * 2 if mode == "train" else dense)
        # DoRA's norm of W + scale·B·A: the d × k × r product, once per call.
        return total + (2 * d * k * r if op == "dora" else 0)
    return low_rank


def traffic_bytes(shape, dtype, op="lowrank"):
    """Minimum bytes a forward moves: read x, A, B, bias (and W), write y."""
    return _set_bytes(shape, dtype, op)


# ----------------------------------------------------------------------------- CUDA


def require_cuda():
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is available "
                           "(torch.cuda.is_available() is False)")


def _graphed(fn, copies):
    """Capture `copies` consecutive calls (one round over the input sets) in a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(copies):
            fn()
    return graph


def _time_batch_cuda(fn, n):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def copy_bandwidth_gbs(device="cuda", nbytes=1 << 30):
    """Device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    us = statistics.median(_time_batch_cuda(lambda: dst.copy_(src), 10) for _ in range(5))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def cuda_graph_calls(calls, copies):
    """Replace every side by a CUDA graph of one round when all sides are short.

    Either every side is graphed or none is, so no graphed side is ever
    compared with an eager one. Each replay runs `copies` calls.
    """
    eager = {name: _time_batch_cuda(fn, max(copies, 8)) for name, fn in calls.items()}
    if max(eager.values()) >= CUDA_GRAPH_BELOW_US:
        return calls, 1, False
    graphs = {name: _graphed(fn, copies) for name, fn in calls.items()}
    return {name: g.replay for name, g in graphs.items()}, copies, True


# ----------------------------------------------------------------------------- driver

def _measure(calls, device, copies, rounds, warmup_s, batch_ms):
    """({side: timing}, whether CUDA graphs were used) for one problem."""
    if device != "cuda":
        return time_sides(calls, _time_batch_cpu, rounds, warmup_s, batch_ms * 1e3), False
    for fn in calls.values():  # compile / autotune outside the graphs
        fn()
    torch.cuda.synchronize()
    calls, per_batch, graphed = cuda_graph_calls(calls, copies)
    timing = time_sides(calls, _time_batch_cuda, rounds, warmup_s, batch_ms * 1e3)
    for t in timing.values():  # a replay runs `per_batch` calls
        for key in ("median_us", "min_us", "max_us"):
            t[key] /= per_batch
        t["samples_us"] = [v / per_batch for v in t["samples_us"]]
        t["calls_per_sample"] *= per_batch
        t["page_faults_per_call"] /= per_batch
    return timing, graphed


def check_settings(rounds, warmup_s, batch_ms, threads, *, options=False):
    """A ValueError (TypeError for a wrong type) naming the first bad timing
    setting, as the argument or, with ``options``, as the command's option: an
    infinite warmup would never end, and torch rejects 0 threads in words that
    name neither."""
    def name(key):
        return "--" + key.replace("_", "-") if options else key

    for key, value in (("rounds", rounds), ("threads", threads)):
        if value is None and key == "threads":  # torch's default
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name(key)} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name(key)} must be >= 1, got {value}")
        if key == "threads" and value > MAX_THREADS:
            raise ValueError(f"{name(key)} must be at most {MAX_THREADS}, got {value}")
    for key, value, positive, most in (("warmup_s", warmup_s, False, MAX_WARMUP_S),
                                       ("batch_ms", batch_ms, True, MAX_BATCH_MS)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name(key)} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"{name(key)} must be finite and {'> 0' if positive else '>= 0'}, "
                             f"got {value}")
        if value > most:
            # Finite, yet a run that would not end in a lifetime (1e300 s).
            raise ValueError(f"{name(key)} must be at most {most:g}, got {float(value):g}")


def run_benchmark(shapes, dtypes, device="cpu", modes=MODES, sides=SIDES, rounds=15,
                  warmup_s=0.2, batch_ms=20.0, threads=None, rotate=True, log=None,
                  op="lowrank"):
    """Measure every (shape, dtype, mode) of ``op``; returns the JSON-ready result dict."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    check_settings(rounds, warmup_s, batch_ms, threads)
    if device == "cuda":
        require_cuda()
    if threads is not None:
        torch.set_num_threads(threads)
    log = log or (lambda msg: None)
    results = []
    extra = {}
    if device == "cuda":
        extra["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
        log(f"copy bandwidth {extra['copy_bandwidth_gbs']:.0f} GB/s")
    jobs = [(s, dt, m) for dt in dtypes for s in shapes for m in modes]
    started = time.perf_counter()
    for n, (shape, dtype_name, mode) in enumerate(jobs, 1):
        dtype = DTYPES[dtype_name]
        copies = copies_for(_set_bytes(shape, dtype, op), device) if rotate else 1
        label = (f"[{n}/{len(jobs)}] M,k,r,d={','.join(map(str, shape))} {dtype_name} {mode} "
                 f"({copies} input sets)")
        log(label + " ...")
        torch._dynamo.reset()
        try:
            calls = build_calls(shape, dtype, device, mode, sides, copies, op=op)
        except (RuntimeError, MemoryError) as exc:
            # torch's words ("DefaultCPUAllocator: can't allocate memory")
            # name no shape; anything else is a bug and keeps its own.
            if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and \
                    "allocate" not in str(exc):
                raise
            raise RuntimeError(f"shape {','.join(map(str, shape))} ({dtype_name}): not enough "
                               f"memory for its inputs ({first_line(exc)})") from exc
        # Forward inputs do not require grad; time them under one no_grad
        # block, as inference code runs them.
        with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
            timing, graphed = _measure(calls, device, copies, rounds, warmup_s, batch_ms)
        entry = dict(shape=dict(zip("Mkrd", shape)), dtype=dtype_name, mode=mode,
                     input_sets=copies, cuda_graphs=graphed, sides=timing)
        ours = timing.get("ours", {}).get("median_us")
        if ours:
            entry["ratios"] = {b: timing[b]["median_us"] / ours for b in BASELINES
                               if b in timing}
            entry["ours_gflops"] = flops(shape, mode, "ours", op) / (ours * 1e3)
            if mode == "fwd":
                entry["ours_gbs"] = traffic_bytes(shape, dtype, op) / (ours * 1e3)
        results.append(entry)
        log(f"    {format_entry(entry)}  ({time.perf_counter() - started:.0f} s)")
    return dict(device=device, op=op, machine=machine_info(device), command=command_line(),
                settings=dict(rounds=rounds, warmup_s=warmup_s, batch_ms=batch_ms,
                              rotate_inputs=rotate, sides=list(sides), modes=list(modes)),
                **extra, results=results)


def command_line():
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "lowrank_ext")):
        argv = ["python", "-m", "lowrank_ext"] + argv[1:]
    # Quoted as a shell would need it: "--shapes 1,4,2,4;2,8,2,8" pasted back
    # unquoted runs two commands.
    return shlex.join(argv)


def format_entry(entry):
    ours = entry["sides"].get("ours", {}).get("median_us")
    parts = [f"ours {ours:.1f} us" if ours else ""]
    for name, ratio in entry.get("ratios", {}).items():
        parts.append(f"{name} {ratio:.2f}x")
    return "  ".join(p for p in parts if p)


def _fmt_us(us):
    if us is None:
        return "-"
    return f"{us:.1f}" if us < 1e4 else f"{us:.0f}"


def markdown_table(result):
    """The ratios table: baseline time / ours (> 1 means ours is faster)."""
    sides = result["settings"]["sides"]
    head = ["M, k, r, d", "dtype", "mode"] + [f"{s} µs" for s in sides]
    head += [f"{b} / ours" for b in BASELINES if b in sides]
    extra_col = result["device"] == "cuda"
    if extra_col:
        head.append("ours GB/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in result["results"]:
        shape = ", ".join(str(v) for v in e["shape"].values())
        row = [shape, e["dtype"], e["mode"]]
        row += [_fmt_us(e["sides"].get(s, {}).get("median_us")) for s in sides]
        ratios = e.get("ratios", {})
        row += [f"{ratios[b]:.2f}×" if b in ratios else "-" for b in BASELINES if b in sides]
        if extra_col:
            row.append(f"{e['ours_gbs']:.0f}" if "ours_gbs" in e else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine_summary(result):
    m = result["machine"]
    text = (f"{m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch_version']} "
            f"(cpu capability {m['torch_cpu_capability']}, "
            f"BLAS {m['torch_blas'].get('BLAS_INFO', '?')})")
    kernels = (m.get("lowrank_ext") or {}).get("cpu_kernels")
    if kernels:
        text += f", lowrank_ext CPU kernels {kernels}"
    if result["device"] == "cuda":
        text = (f"{m['gpu_name']}, CUDA {m['cuda_version']}, torch {m['torch_version']}, "
                f"copy bandwidth {result.get('copy_bandwidth_gbs', 0):.0f} GB/s")
    if m.get("load_average"):
        text += f"; load average at the end {m['load_average'][0]:.2f}"
    return text


# A side whose slowest sample took this many times its fastest was disturbed
# (other load on the machine, frequency changes): its median is suspect.
NOISY_SPREAD = 3.0


def _label(entry):
    """"M,k,r,d dtype mode" of one result entry."""
    shape = ",".join(str(v) for v in entry["shape"].values())
    return f"{shape} {entry['dtype']} {entry['mode']}"


def noisy_entries(result):
    """["M,k,r,d dtype mode side", ...] for the sides whose samples spread past NOISY_SPREAD."""
    found = []
    for entry in result["results"]:
        for side, timing in entry["sides"].items():
            if timing["min_us"] > 0 and timing["max_us"] / timing["min_us"] > NOISY_SPREAD:
                found.append(f"{_label(entry)} {side}")
    return found


# CPU cores' worth of other work (other processes, the VM's steal) during a
# problem's timed rounds above which its figures are not to be trusted: the
# sides' threads shared the cores. On an idle 2-core VM it read 0.005–0.02
# over the default rounds (the counters tick every 10 ms: summed sample by
# sample they read −0.3 to 0.3); with two busy loops beside the benchmark,
# 0.9–1.0. (The samples of a steadily loaded machine spread too little for
# NOISY_SPREAD to see it: a baseline 4000× slower than ours, which ran on one
# thread, was the symptom.)
BUSY_OTHER_LOAD = 0.5


def busy_entries(result):
    """["M,k,r,d dtype mode", ...] for the problems during whose rounds other work
    took more than BUSY_OTHER_LOAD cores."""
    found = []
    for entry in result["results"]:
        loads = [t.get("other_load") or 0.0 for t in entry["sides"].values()]
        if loads and max(loads) > BUSY_OTHER_LOAD:
            found.append(_label(entry))
    return found


def plot(result, path, fmt_path=None):
    """Bar chart of baseline / ours per shape, dtype and mode (needs matplotlib),
    in the format of ``fmt_path``'s extension (default ``path``'s)."""
    import textwrap

    from ._plotting import load_matplotlib, plot_format

    plt = load_matplotlib()
    entries = result["results"]
    labels = [f"{','.join(str(v) for v in e['shape'].values())}\n{e['dtype']} {e['mode']}"
              for e in entries]
    baselines = [b for b in BASELINES if any(b in e.get("ratios", {}) for e in entries)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(entries) + 2), 4.5))
    width = 0.8 / max(len(baselines), 1)
    for i, b in enumerate(baselines):
        values = [e.get("ratios", {}).get(b, 0) for e in entries]
        ax.bar([j + i * width for j in range(len(entries))], values, width, label=f"{b} / ours")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(baselines) - 1) / 2 for j in range(len(entries))])
    ax.set_xticklabels(labels, fontsize=7)
    ours = {"lora": "lora_linear", "dora": "the DoRA layer"}.get(result.get("op"),
                                                                  "lowrank_linear")
    ax.set_ylabel(f"time ratio (> 1: {ours} is faster)")
    # Wrapped to the figure's width, so that tight_layout keeps it whole.
    ax.set_title("\n".join(textwrap.wrap(machine_summary(result), int(14 * fig.get_figwidth()))),
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=plot_format(fmt_path or path))
    plt.close(fig)
