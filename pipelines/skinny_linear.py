"""Linear layers of a few rows (a batched decode step): weights streamed once through tensor cores.

A 16-row decode step of Qwen 2.5 7B reads 14 GB of weights for 16 x 15 GFLOP: bound by memory bandwidth,
yet cuBLAS's kernels for these shapes read the weights at 67-81% of an H100's bandwidth
(bench/qwen_profile.py --rows 16). Here each program owns a block of output features, walks K (or one
slice of it) and multiplies the weight tile against all the rows at once (`tl.dot`, the rows padded to
16); with `split` > 1 the slices' fp32 partial sums are added by a second kernel in a fixed order, so
the result is the same every run. The launch shape is data (`Config`), chosen per weight shape by
bench/skinny_gemm.py.

Two uses. With FP8 weights and a per-output-feature scale (`scale`), each weight tile is read as one
byte per value and widened to the rows' dtype in registers, the scale applied to the fp32 sums: this is
the product of pipelines/fp8_linear.py (GENQ_CHAT_WEIGHTS=fp8), half the bytes of bf16. With bf16
weights it is a benchmark candidate (bench/qwen_profile.py's `+skinny`): on an H100 it beat cuBLAS by
4-7% on four of five products but gained 2.5% in the 16-row step, inside the profile's spread
(docs/PERFORMANCE.md, fourth session).

One row (a single chat's decode step) has nothing for tensor cores to share, and padding it to 16 wastes
the tile: `Config.vector` runs a matrix-vector kernel instead, fp32 products on CUDA cores, each program a
few output features over a long stretch of K so that every SM keeps many weight loads in flight (with FP8
weights one byte a value, so the tiles are twice as long as bf16's for the same bytes).

Importing this module needs Triton (it comes with CUDA builds of torch). tests/test_skinny_linear.py runs
the kernels on a CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

MAX_ROWS = 16  # one padded tile of rows


class Config(NamedTuple):
    block_n: int = 64  # output features per program
    block_k: int = 128  # reduction step
    split: int = 1  # programs sharing one block of features, each over a slice of K
    warps: int = 4
    stages: int = 4
    vector: bool = False  # one row only: the matrix-vector kernel (no tensor cores)


# (out features, in features, one row, FP8 weights) -> launch shape, measured per weight shape
# (bench/skinny_gemm.py). Qwen 2.5 7B's one-row FP8 products, best of 128-156 shapes each on an H200
# (`bench.skinny_gemm --rows 1 --weights fp8`, docs/PERFORMANCE.md tenth session): 2.0-4.1 TB/s.
TABLE: dict[tuple[int, int, bool, bool], Config] = {
    (4608, 3584, True, True): Config(8, 512, 1, 8, 1, True),  # q|k|v
    (3584, 3584, True, True): Config(4, 1024, 1, 4, 1, True),  # o
    (3584, 18944, True, True): Config(4, 1024, 1, 4, 1, True),  # down
    (37888, 3584, True, True): Config(16, 512, 1, 8, 1, True),  # gate|up
    (152064, 3584, True, True): Config(16, 512, 1, 8, 1, True),  # LM head
}


def config_for(n: int, k: int, fp8: bool = False, rows: int = MAX_ROWS) -> Config:
    """TABLE's entry for the shape; else, for FP8 weights at one row, the vector kernel over blocks of 16
    features x 512 of K where that still gives 4 programs per SM of a 132-SM card, else 4 x 1024; for FP8
    weights at more rows, blocks of 64 features x 128 of K (the fastest for every Qwen 2.5 7B projection on
    an H100, bench/skinny_gemm.py) with K split in up to 4 slices until there are two programs per SM.
    Else Config()."""
    key = (n, k, rows == 1, fp8)
    if key in TABLE or not fp8:
        return TABLE.get(key, Config())
    if rows == 1:  # wide products: longer rows of features; narrow ones: more programs
        return Config(16, 512, 1, 8, 1, True) if n >= 16 * 4 * 132 else Config(4, 1024, 1, 4, 1, True)
    programs, split = triton.cdiv(n, 64), 1
    while split < 4 and programs * split < 264 and k // (2 * split) >= 256:
        split *= 2
    return Config(64, 128, split, 4, 4)


@triton.jit
def _skinny_kernel(X, W, Scale, Bias, Out, M, N, K, K_SLICE, sx_m, sw_n, so_m, so_s,
                   HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """out[m, n] = scale[n] * sum_k x[m, k] w[n, k] over this program's slice of K; the weight tile is
    the dot's left operand, so blocks of 64+ features use Hopper's wgmma with the rows as its narrow side."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_s * K_SLICE
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_lo, k_lo + K_SLICE, BLOCK_K):
        kk = k + rk
        if EVEN:  # every tile whole: loads without masks vectorise fully
            w = tl.load(W + rn[:, None] * sw_n + kk[None, :])
        else:
            w = tl.load(W + rn[:, None] * sw_n + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        x = tl.load(X + rm[None, :] * sx_m + kk[:, None], mask=(rm[None, :] < M) & (kk[:, None] < K), other=0.0)
        if HAS_SCALE:  # FP8 weights: exact in bf16 (3 mantissa bits), so the dot rounds only its sums
            w = w.to(x.dtype)
        acc = tl.dot(w, x, acc)
    if HAS_SCALE:  # per output feature: commutes with the sum, so partial slices may carry it too
        acc = acc * tl.load(Scale + rn, mask=rn < N, other=0.0)[:, None]
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    if PARTIAL:
        tl.store(Out + pid_s * so_s + rm[None, :] * so_m + rn[:, None], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(Out + rm[None, :] * so_m + rn[:, None], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _vector_kernel(X, W, Scale, Bias, Out, N, K, K_SLICE, sw_n, so_s, HAS_SCALE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN: tl.constexpr):
    """out[n] = scale[n] * sum_k x[k] w[n, k] over this program's slice of K, for one row: products summed
    per lane in fp32 along the slice, and across lanes once at the end."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_s * K_SLICE
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(k_lo, k_lo + K_SLICE, BLOCK_K):
        kk = k + rk
        if EVEN:
            w = tl.load(W + rn[:, None] * sw_n + kk[None, :])
            x = tl.load(X + kk)
        else:
            w = tl.load(W + rn[:, None] * sw_n + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            x = tl.load(X + kk, mask=kk < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y = y * tl.load(Scale + rn, mask=rn < N, other=0.0)
    if PARTIAL:
        tl.store(Out + pid_s * so_s + rn, y, mask=rn < N)
    else:
        if HAS_BIAS:
            y += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(Out + rn, y.to(Out.dtype.element_ty), mask=rn < N)


@triton.jit
def _sum_slices_kernel(Part, Bias, Out, N, TOTAL, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < TOTAL
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # a fixed order: the same sums every run
        y += tl.load(Part + s * TOTAL + i, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(Bias + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + i, y.to(Out.dtype.element_ty), mask=ok)


def _k_slice(k: int, cfg: Config) -> int:
    """K per split, whole blocks; the last slice may run past K (masked)."""
    return triton.cdiv(triton.cdiv(k, cfg.split), cfg.block_k) * cfg.block_k


@triton_op("genq::skinny_linear", mutates_args={})
def _skinny_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                   block_n: int, block_k: int, split: int, warps: int, stages: int, vector: bool) -> torch.Tensor:
    cfg = Config(block_n, block_k, split, warps, stages, vector)
    n, k = weight.shape
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    k_slice = _k_slice(k, cfg)
    even = n % block_n == 0 and k % k_slice == 0
    partial = split > 1
    target = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if partial else out
    has_bias, has_scale = bias is not None, scale is not None
    operands = (rows, weight, scale if has_scale else weight, bias if has_bias else weight, target)
    grid = (triton.cdiv(n, block_n), split)
    if vector:
        wrap_triton(_vector_kernel)[grid](
            *operands, n, k, k_slice, weight.stride(0), n, HAS_SCALE=has_scale, HAS_BIAS=has_bias, PARTIAL=partial,
            BLOCK_N=block_n, BLOCK_K=block_k, EVEN=even, num_warps=warps, num_stages=stages)
    else:
        wrap_triton(_skinny_kernel)[grid](
            *operands, m, n, k, k_slice, rows.stride(0), weight.stride(0), n, m * n, HAS_SCALE=has_scale,
            HAS_BIAS=has_bias, PARTIAL=partial, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, EVEN=even,
            num_warps=warps, num_stages=stages)
    if partial:
        block = 1024
        wrap_triton(_sum_slices_kernel)[(triton.cdiv(m * n, block),)](
            target, bias if has_bias else target, out, n, m * n, SPLIT=split, HAS_BIAS=has_bias, BLOCK=block,
            num_warps=4)
    return out.reshape(*x.shape[:-1], n)


FP8_WEIGHTS = (torch.float8_e4m3fn,)


def supported(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Inputs the kernels take: at most MAX_ROWS rows, a 2-D weight with unit stride along K, x's rows
    contiguous along K, a floating x; the weight of x's dtype, or FP8 with an fp32 scale per output feature."""
    if scale is None:
        same = x.dtype == weight.dtype
    else:
        same = (weight.dtype in FP8_WEIGHTS and scale.dtype == torch.float32 and scale.shape == weight.shape[:1]
                and scale.is_contiguous())
    return (x.numel() // max(1, x.shape[-1]) <= MAX_ROWS and weight.dim() == 2 and weight.stride(1) == 1
            and x.stride(-1) == 1 and x.dtype.is_floating_point and same)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           cfg: Config | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight * scale[:, None], bias) for at most MAX_ROWS rows of x (any leading shape),
    through the kernels; `cfg` defaults to config_for's for the weight's shape and the row count."""
    rows = x.numel() // max(1, x.shape[-1])
    if not supported(x, weight, scale):
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} {x.dtype} / weight {tuple(weight.shape)} "
                         f"{weight.dtype} not supported")
    cfg = cfg or config_for(*weight.shape, fp8=scale is not None, rows=rows)
    if cfg.vector and rows != 1:
        raise ValueError(f"skinny_linear: the vector kernel takes one row, x has {rows}")
    return torch.ops.genq.skinny_linear(x, weight, scale, bias, *cfg)
