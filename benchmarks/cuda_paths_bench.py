"""Times every CUDA path of lowrank_linear against the two-F.linear composition
and the dense layer, to tune the path choice (csrc/cuda/lowrank_plan.*).

    python benchmarks/cuda_paths_bench.py --json paths.json

Each side runs as a CUDA graph of `--calls` calls (launch overhead hidden
equally on both sides) over `--rotate` input sets, so that the inputs of large
shapes are not served from L2. Reports the median time per call, the speedup
over the composition and the achieved bandwidth against a measured copy.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import lowrank_ext  # noqa: F401  (registers the ops)

path_op = torch.ops.lowrank_ext_internal.lowrank_linear_cuda_path
PATHS = ("auto", "tensor_core", "split_k", "cublas")


def graph_time_us(fn, calls, repeats):
    """Median microseconds per call of fn(i), i = 0..calls-1, captured in a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def copy_bandwidth_gbs():
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us(lambda i: dst.copy_(src), 10, 10)
    return 2 * src.numel() / us / 1e3


def bench_shape(M, k, r, d, dtype, calls, repeats, rotate):
    sets = []
    for _ in range(rotate):
        x = torch.randn(M, k, device="cuda", dtype=dtype)
        sets.append(x)
    A = torch.randn(r, k, device="cuda", dtype=dtype) / k**0.5
    B = torch.randn(d, r, device="cuda", dtype=dtype) / r**0.5
    W = B @ A
    bias = torch.randn(d, device="cuda", dtype=dtype)
    row = dict(M=M, k=k, r=r, d=d, dtype=str(dtype).replace("torch.", ""))
    row["composition_us"] = graph_time_us(
        lambda i: F.linear(F.linear(sets[i % rotate], A), B, bias), calls, repeats)
    row["dense_us"] = graph_time_us(
        lambda i: F.linear(sets[i % rotate], W, bias), calls, repeats)
    for path in PATHS:
        try:
            row[f"{path}_us"] = graph_time_us(
                lambda i: path_op(sets[i % rotate], A, B, bias, path, False), calls, repeats)
        except (RuntimeError, ValueError) as exc:  # path cannot run this problem
            row[f"{path}_us"] = None
            row[f"{path}_error"] = str(exc).splitlines()[0]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    smem = getattr(props, "shared_memory_per_block_optin", 227 * 1024)
    row["auto_path"] = torch.ops.lowrank_ext_internal.cuda_plan(
        M, k, r, d, dtype, props.major, props.multi_processor_count, smem, "auto")[0]
    elem = torch.finfo(dtype).bits // 8
    row["min_bytes"] = (M * k + r * k + d * r + M * d + d) * elem
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    shapes = [(M, 4096, r, 4096) for r in (16, 64, 256)
              for M in (1, 4, 16, 17, 64, 256, 1024, 2048, 4096, 8192)]
    shapes.append((8192, 8192, 256, 8192))
    rows = []
    print(f"copy bandwidth {copy_gbs:.0f} GB/s on {torch.cuda.get_device_name()}")
    print(f"{'dtype':>8} {'M':>5} {'k':>5} {'r':>4} {'d':>5} {'comp':>8} {'dense':>8} "
          + " ".join(f"{p:>11}" for p in PATHS) + "  auto→  best/comp  GB/s(auto)")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for M, k, r, d in shapes:
            big = M * max(k, d) * 2 > 40 * 2**20
            row = bench_shape(M, k, r, d, dtype, args.calls, args.repeats, 3 if big else 1)
            row["copy_gbs"] = copy_gbs
            auto = row["auto_us"]
            row["auto_speedup_vs_composition"] = row["composition_us"] / auto
            row["auto_gbs"] = row["min_bytes"] / auto / 1e3
            rows.append(row)
            cells = " ".join(
                f"{row[f'{p}_us']:>11.2f}" if row[f"{p}_us"] is not None else f"{'-':>11}"
                for p in PATHS)
            best = min(v for p in PATHS if (v := row[f"{p}_us"]) is not None)
            print(f"{name:>8} {M:>5} {k:>5} {r:>4} {d:>5} {row['composition_us']:>8.2f} "
                  f"{row['dense_us']:>8.2f} {cells}  {row['auto_path']:>11} "
                  f"{row['composition_us'] / best:>5.2f}x {row['auto_gbs']:>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_gbs=copy_gbs, device=torch.cuda.get_device_name(), rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
