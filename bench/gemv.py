"""Matrix-vector products of a one-row Qwen 2.5 7B decode step: achieved bandwidth per method and shape.

    python -m bench.gemv [--tiny] [--out DIR] [--budget-s S]

For each projection shape (q|k|v with bias, o, down, gate|up, LM head): cuBLAS (F.linear), inductor's
fused reduction (coordinate-descent tuned, as the chat decoder compiles it; for down also with its
producer SiLU(gate) * up fused in, as in the decode graph), and pipelines/skinny_linear.py's one-row
(`vector`) kernel over a sweep of block sizes and splits (kernel, partial sums and bias, as one op).
Every figure is a CUDA-graph replay over enough copies of the weight that none is served from L2 (as a
decode step reads 28 layers' weights once each), so launch overhead and cache hits do not flatter small
kernels. Writes OUT/gemv.json: GB/s per method and the best kernel config per shape and per split.

Measured on an H200 (docs/PERFORMANCE.md, "Qwen: hand-written matrix-vector kernels"): in bf16 the kernel
beats inductor on down (+6%) and o (+7%) alone, but in the compiled decode step it was slower (192 vs 206
tok/s: more kernels and idle gaps than the bandwidth saved), so the bf16 decoder keeps inductor's
reductions; with FP8 weights the chat engine's one-row step runs it (GENQ_CHAT_WEIGHTS=fp8).
"""
from __future__ import annotations

import itertools
import math
import os

import torch
import torch.nn.functional as F

from bench.harness import Report, graph_time, parse_args

# name, out_features, in_features, bias (Qwen 2.5 7B: hidden 3584, MLP 18944, 28 + 2 x 4 heads of 128)
SHAPES = [("qkv", 4608, 3584, True), ("o", 3584, 3584, False), ("down", 3584, 18944, False),
          ("gate_up", 37888, 3584, False), ("lm_head", 152064, 3584, False)]
TINY = [("qkv", 96, 64, True), ("down", 64, 256, False)]


def vector_configs(n: int, k: int, tiny: bool, elem: int = 2):
    """Launch shapes of skinny_linear's one-row kernel for an n x k weight of `elem` bytes a value: blocks of
    a few features x 256-2048 bytes of K, 8-64 weights a thread, enough programs for 132 SMs."""
    from pipelines.skinny_linear import Config

    if tiny:
        yield Config(16, 32, 2, 4, 1, True)
        return
    for bn, kbytes, split, warps, stages in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024, 2048),
                                                               (1, 2, 4), (4, 8), (1, 3)):
        bk = kbytes // elem
        if (8 <= bn * bk // (32 * warps) <= 64 and k // split >= bk and bn <= n
                and -(-n // bn) * split >= 132):
            yield Config(bn, bk, split, warps, stages, True)


def kernel_available(t: torch.Tensor) -> bool:
    """Whether Triton kernels can run on t's device (TRITON_INTERPRET=1 runs them on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:  # CPU-only installs
        return False
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _shape(name, n, k, bias, args, report, device) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bytes_per = n * k * 2 + (n * 2 if bias else 0)
    copies = 1 if args.tiny else max(2, math.ceil(400e6 / bytes_per))  # 8x the H200's 50 MB L2
    ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    bs = [torch.randn(n, device=device, dtype=dtype) if bias else None for _ in range(copies)]
    xs = [torch.randn(1, 1, k, device=device, dtype=dtype) for _ in range(copies)]
    reps = 1 if args.tiny else max(1, math.ceil(2e9 / (bytes_per * copies)))
    rate = lambda seconds: round(bytes_per / seconds / 1e9, 1)  # noqa: E731  GB/s per call
    row = {"n": n, "k": k, "bias": bias, "mbytes": round(bytes_per / 1e6, 1), "copies": copies}

    def each(f):
        return lambda: [f(x, w, b) for x, w, b in zip(xs, ws, bs)]

    row["cublas_gbs"] = rate(graph_time(each(F.linear), reps, device) / copies)
    if device == "cuda":
        import torch._inductor.config as inductor_config

        with inductor_config.patch(coordinate_descent_tuning=True):
            ind = torch.compile(lambda x, w, b: F.linear(x, w, b), dynamic=False)
            row["inductor_gbs"] = rate(graph_time(each(ind), reps, device) / copies)
            if name == "down":  # the decode graph's shape: the vector's producer fused into each row's program
                gus = [torch.randn(1, 1, 2 * k, device=device, dtype=dtype) for _ in range(copies)]
                fused = torch.compile(lambda gu, w: F.linear(F.silu(gu[..., :k]) * gu[..., k:], w), dynamic=False)
                row["inductor_producer_fused_gbs"] = rate(
                    graph_time(lambda: [fused(g, w) for g, w in zip(gus, ws)], reps, device) / copies)
    if not kernel_available(xs[0]):
        return row
    from pipelines import skinny_linear

    best: dict[int, tuple] = {}  # split -> (config, seconds): the op as the decode step runs it
    for cfg in vector_configs(n, k, args.tiny):
        if report.elapsed() > args.budget_s:
            row["sweep_cut_by_budget"] = True
            break
        try:
            op = each(lambda x, w, b: skinny_linear.linear(x, w, b, cfg))
            seconds = graph_time(op, reps, device) / copies
        except Exception as exc:  # a config Triton cannot compile (registers, shared memory): skip it
            row.setdefault("failed_configs", []).append([*cfg, type(exc).__name__])
            continue
        if cfg.split not in best or seconds < best[cfg.split][1]:
            best[cfg.split] = (cfg, seconds)
    if best:
        row["splitk_best_per_split"] = {s: {**c._asdict(), "gbs": rate(t)} for s, (c, t) in sorted(best.items())}
        cfg, seconds = min(best.values(), key=lambda item: item[1])
        row["splitk_best"] = {**cfg._asdict(), "gbs": rate(seconds)}
        y = skinny_linear.linear(xs[0], ws[0], bs[0], cfg).float()
        ref = F.linear(xs[0], ws[0], bs[0]).float()
        row["rel_l2_vs_cublas"] = float((y - ref).norm() / ref.norm())
        row["deterministic"] = bool(torch.equal(y, skinny_linear.linear(xs[0], ws[0], bs[0], cfg).float()))
    return row


def main():
    args = parse_args(__doc__)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("gemv", args)
    for name, n, k, bias in TINY if args.tiny else SHAPES:
        report.stage(name, lambda: _shape(name, n, k, bias, args, report, device))


if __name__ == "__main__":
    main()
