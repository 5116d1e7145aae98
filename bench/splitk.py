"""A split-K matrix-vector kernel (Triton): what hand-written GEMV gains in a one-row Qwen decode step.

Used by bench/gemv.py only. Inductor turns a one-row step's matrix-vector products into fused
reductions; bench/qwen_profile.py showed the narrow projections (down, o, q|k|v) below the bandwidth of
the wide ones. This kernel reads a materialised vector (inductor recomputes the down projection's
producer SiLU(gate) * up in every output row's program) and can split the reduction over K across
programs: with `split` > 1 each writes fp32 partial sums for its block of rows and a second small kernel
adds them in a fixed order, adds the bias and casts (deterministic). It returns the finished vector, as
inductor would otherwise fuse the partials' sum into the next RMSNorm, recomputed per program.

Measured on an H200 (docs/PERFORMANCE.md, "Qwen: hand-written matrix-vector kernels"): it beats
inductor on down (+6%) and o (+7%) alone, but in the compiled decode step it was slower (192 vs 206
tok/s: more kernels and idle gaps than the bandwidth saved), so the production decoder does not use it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


class Config(NamedTuple):
    block_n: int
    block_k: int
    split: int
    warps: int


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on t's device (TRITON_INTERPRET=1 runs it on the CPU)."""
    if triton is None:
        return False
    import os

    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    from pipelines.skinny_linear import _sum_slices_kernel

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, K_PER_SPLIT, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        start = pid_k * K_PER_SPLIT
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            cols = start + k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if PARTIAL:  # fp32 partial sums, one row of [split, N] per program column
            tl.store(out_ptr + pid_k * N + rows, y, mask=row_ok)
        else:
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @torch.library.triton_op("genq::gemv", mutates_args=())
    def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, split: int, block_n: int,
              block_k: int, warps: int) -> torch.Tensor:
        """weight @ x (+ bias) for a 1-D x, in x's dtype."""
        n, k = weight.shape
        out = torch.empty((n,), device=x.device, dtype=x.dtype)
        per_split = -(-(-(-k // split)) // block_k) * block_k  # ceil(k / split), rounded up to whole blocks
        grid = (-(-n // block_n), split)
        has_bias = bias is not None
        target = torch.empty((split, n), device=x.device, dtype=torch.float32) if split > 1 else out
        torch.library.wrap_triton(_gemv_kernel)[grid](
            x, weight, bias if has_bias else x, target, n, k, per_split, weight.stride(0), BLOCK_N=block_n,
            BLOCK_K=block_k, HAS_BIAS=has_bias, PARTIAL=split > 1, num_warps=warps)
        if split > 1:
            # the partial sums of one row: pipelines/skinny_linear.py's merge with a single row of n
            torch.library.wrap_triton(_sum_slices_kernel)[(-(-n // 1024),)](
                target, bias if has_bias else target, out, n, n, SPLIT=split, HAS_BIAS=has_bias, BLOCK=1024,
                num_warps=4)
        return out


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """weight @ x (+ bias) for a 1-D, contiguous x at config cfg."""
    return torch.ops.genq.gemv(x, weight, bias, cfg.split, cfg.block_n, cfg.block_k, cfg.warps)
