"""The matrix products of a batched Qwen 2.5 7B decode step: cuBLAS against pipelines/skinny_linear.py.

    python -m bench.skinny_gemm [--tiny] [--rows 1,4,16] [--weights bf16,fp8] [--out DIR] [--budget-s S]

For each projection (q|k|v with bias, o, down, gate|up, LM head) and row count: cuBLAS (F.linear, what
the compiled decode step calls for more than one row) and the Triton kernels over a sweep of Config (block
of features, block of K, split, warps, stages). With `fp8` the kernels read e4m3 weights with a scale per
output feature (pipelines/fp8_linear.py, GENQ_CHAT_WEIGHTS=fp8); cuBLAS stays the bf16 baseline, and
`torch._scaled_mm` (e4m3 weights and per-row e4m3 activations quantised inside the timed call, rowwise
scales) is timed beside them; `speedup_vs_cublas` compares times, since the bytes differ. Every figure
is a CUDA-graph replay over enough copies of the weight that none is read from L2 (a decode step reads
28 layers' weights once each), so launch overhead and cache hits do not flatter small kernels. Writes
OUT/skinny_gemm.json: GB/s of weight read per method, the best config per shape and row count, the top
five, and the best config's rel. L2 against cuBLAS and whether two calls give the same bits.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from bench.gemv import SHAPES, TINY, vector_configs
from bench.harness import Report, graph_time, parse_args


def configs(n: int, k: int, tiny: bool, elem: int = 2, rows: int = 16):
    from pipelines.skinny_linear import Config

    if rows == 1:  # the one-row (vector) kernel
        yield from vector_configs(n, k, tiny, elem)
        return
    if tiny:
        yield Config(16, 32, 1, 4, 2)
        yield Config(16, 32, 2, 4, 2)
        return
    blocks_k = (128, 256) if elem == 2 else (128, 256, 512)  # one-byte weights: longer tiles, same bytes
    for bn, bk, split, stages in itertools.product((32, 64, 128), blocks_k, (1, 2, 4), (4,)):
        programs = -(-n // bn) * split
        # enough programs to fill 132 SMs, not so many slices that partial sums cost more than they save
        if 120 <= programs <= 4800 and k // split >= 2 * bk and bn * bk * elem * stages <= 160 * 1024:
            yield Config(bn, bk, split, 8 if bn >= 128 else 4, stages)


def _shape(name: str, n: int, k: int, bias: bool, rows: int, fp8: bool, args, report: Report, device: str) -> dict:
    from pipelines import fp8_linear, skinny_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bf16_bytes = n * k * 2 + (n * 2 if bias else 0)
    bytes_per = n * k + n * 4 + (n * 2 if bias else 0) if fp8 else bf16_bytes
    copies = 1 if args.tiny else max(2, math.ceil(400e6 / bytes_per))  # 8x an H100's or H200's L2
    ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    bs = [torch.randn(n, device=device, dtype=dtype) if bias else None for _ in range(copies)]
    xs = [torch.randn(rows, 1, k, device=device, dtype=dtype) for _ in range(copies)]
    reps = 1 if args.tiny else max(1, math.ceil(8e8 / (bytes_per * copies)))
    rate = lambda seconds: round(bytes_per / seconds / 1e9, 1)  # noqa: E731  GB/s per call
    row = {"n": n, "k": k, "rows": rows, "bias": bias, "weights": "fp8" if fp8 else "bf16",
           "mbytes": round(bytes_per / 1e6, 1), "copies": copies}

    def each(f, weights):
        return lambda: [f(x, *w, b) for x, w, b in zip(xs, weights, bs)]

    cublas_s = graph_time(each(F.linear, [(w,) for w in ws]), reps, device) / copies
    row["cublas_gbs"] = round(bf16_bytes / cublas_s / 1e9, 1)  # bf16 weights either way
    row["cublas_us"] = round(cublas_s * 1e6, 1)
    kernel_weights = [fp8_linear.quantise(w) if fp8 else (w,) for w in ws]
    if fp8:
        del ws[1:]  # the bf16 copies were only for cuBLAS: room for the e4m3 ones
        if device == "cuda":
            try:
                row["scaled_mm_us"] = round(graph_time(each(fp8_linear.scaled_mm, kernel_weights), reps, device)
                                            / copies * 1e6, 1)
                row["scaled_mm_speedup_vs_cublas"] = round(cublas_s * 1e6 / row["scaled_mm_us"], 3)
            except Exception as exc:  # noqa: BLE001  recorded: _scaled_mm's shape rules vary by release
                row["scaled_mm_error"] = f"{type(exc).__name__}: {exc}"[:300]

    def kernel(cfg):
        if fp8:
            return lambda x, q, s, b: skinny_linear.linear(x, q, b, cfg, scale=s)
        return lambda x, w, b: skinny_linear.linear(x, w, b, cfg)

    results = []
    for cfg in configs(n, k, args.tiny, elem=1 if fp8 else 2, rows=rows):
        if report.elapsed() > args.budget_s:
            row["sweep_cut_by_budget"] = True
            break
        try:
            seconds = graph_time(each(kernel(cfg), kernel_weights), reps, device) / copies
        except Exception as exc:  # a config Triton cannot compile (registers, shared memory): skip it
            row.setdefault("failed_configs", []).append([*cfg, type(exc).__name__])
            continue
        results.append((seconds, cfg))
    if results:
        results.sort(key=lambda item: item[0])
        row["top"] = [{**c._asdict(), "gbs": rate(t), "us": round(t * 1e6, 1)} for t, c in results[:5]]
        best = results[0][1]
        row["best"] = row["top"][0]
        row["speedup_vs_cublas"] = round(cublas_s / results[0][0], 3)
        y = kernel(best)(xs[0], *kernel_weights[0], bs[0]).float()
        ref = F.linear(xs[0], ws[0], bs[0]).float()
        row["rel_l2_vs_cublas"] = float((y - ref).norm() / ref.norm())
        if fp8:  # the kernel's own error: against the same e4m3 weights dequantised, products in fp32
            exact = F.linear(xs[0].float(), fp8_linear.dequantise(*kernel_weights[0], torch.float32),
                             None if bs[0] is None else bs[0].float())
            row["rel_l2_vs_dequantised"] = float((y - exact).norm() / exact.norm())
        row["deterministic"] = bool(torch.equal(y, kernel(best)(xs[0], *kernel_weights[0], bs[0]).float()))
    return row


def main():
    def options(ap):
        ap.add_argument("--rows", default="16,1")
        ap.add_argument("--weights", default="bf16", help="bf16, fp8 or both (comma-separated)")

    args = parse_args(__doc__, options)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("skinny_gemm", args)
    for weights in args.weights.split(","):
        suffix = "" if weights == "bf16" else f"_{weights}"
        for rows in [int(r) for r in args.rows.split(",")]:
            for name, n, k, bias in TINY if args.tiny else SHAPES:
                report.stage(f"{name}_{rows}rows{suffix}",
                             lambda: _shape(name, n, k, bias, rows, weights == "fp8", args, report, device))


if __name__ == "__main__":
    main()
