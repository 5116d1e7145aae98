"""The matrix products of a batched Qwen 2.5 7B decode step: cuBLAS against bench/skinny_linear.py.

    python -m bench.skinny_gemm [--tiny] [--rows 1,4,16] [--out DIR] [--budget-s S]

For each projection (q|k|v with bias, o, down, gate|up, LM head) and row count: cuBLAS (F.linear, what
the compiled decode step calls for more than one row) and the Triton kernels over a sweep of Config (block
of features, block of K, split, warps, stages). Every figure is a CUDA-graph replay over enough copies of
the weight that none is read from L2 (a decode step reads 28 layers' weights once each), so launch
overhead and cache hits do not flatter small kernels. Writes OUT/skinny_gemm.json: GB/s of weight read
per method, the best config per shape and row count, the top five, and the best config's rel. L2 against
cuBLAS and whether two calls give the same bits.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from bench.gemv import SHAPES, TINY
from bench.harness import Report, graph_time, parse_args


def configs(n: int, k: int, tiny: bool):
    from bench.skinny_linear import Config

    if tiny:
        yield Config(16, 32, 1, 4, 2)
        yield Config(16, 32, 2, 4, 2)
        return
    for bn, bk, split, stages in itertools.product((32, 64, 128), (128, 256), (1, 2, 4), (4,)):
        programs = -(-n // bn) * split
        # enough programs to fill 132 SMs, not so many slices that partial sums cost more than they save
        if 120 <= programs <= 4800 and k // split >= 2 * bk and bn * bk * 2 * stages <= 160 * 1024:
            yield Config(bn, bk, split, 8 if bn >= 128 else 4, stages)


def _shape(name: str, n: int, k: int, bias: bool, rows: int, args, report: Report, device: str) -> dict:
    from bench import skinny_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bytes_per = n * k * 2 + (n * 2 if bias else 0)
    copies = 1 if args.tiny else max(2, math.ceil(400e6 / bytes_per))  # 8x an H100's or H200's L2
    ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    bs = [torch.randn(n, device=device, dtype=dtype) if bias else None for _ in range(copies)]
    xs = [torch.randn(rows, 1, k, device=device, dtype=dtype) for _ in range(copies)]
    reps = 1 if args.tiny else max(1, math.ceil(8e8 / (bytes_per * copies)))
    rate = lambda seconds: round(bytes_per / seconds / 1e9, 1)  # noqa: E731  GB/s per call
    row = {"n": n, "k": k, "rows": rows, "bias": bias, "mbytes": round(bytes_per / 1e6, 1), "copies": copies}

    def each(f):
        return lambda: [f(x, w, b) for x, w, b in zip(xs, ws, bs)]

    row["cublas_gbs"] = rate(graph_time(each(F.linear), reps, device) / copies)
    results = []
    for cfg in configs(n, k, args.tiny):
        if report.elapsed() > args.budget_s:
            row["sweep_cut_by_budget"] = True
            break
        try:
            seconds = graph_time(each(lambda x, w, b: skinny_linear.linear(x, w, b, cfg)), reps, device) / copies
        except Exception as exc:  # a config Triton cannot compile (registers, shared memory): skip it
            row.setdefault("failed_configs", []).append([*cfg, type(exc).__name__])
            continue
        results.append((seconds, cfg))
    if results:
        results.sort(key=lambda item: item[0])
        row["top"] = [{**c._asdict(), "gbs": rate(t)} for t, c in results[:5]]
        best = results[0][1]
        row["best"] = row["top"][0]
        row["best_vs_cublas"] = round(row["best"]["gbs"] / row["cublas_gbs"], 3)
        y = skinny_linear.linear(xs[0], ws[0], bs[0], best).float()
        ref = F.linear(xs[0], ws[0], bs[0]).float()
        row["rel_l2_vs_cublas"] = float((y - ref).norm() / ref.norm())
        row["deterministic"] = bool(torch.equal(y, skinny_linear.linear(xs[0], ws[0], bs[0], best).float()))
    return row


def main():
    args = parse_args(__doc__, lambda ap: ap.add_argument("--rows", default="16,1"))
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("skinny_gemm", args)
    for rows in [int(r) for r in args.rows.split(",")]:
        for name, n, k, bias in TINY if args.tiny else SHAPES:
            report.stage(f"{name}_{rows}rows",
                         lambda: _shape(name, n, k, bias, rows, args, report, device))


if __name__ == "__main__":
    main()
