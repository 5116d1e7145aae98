"""Split-K matrix-vector products for the one-row decode step (Triton; CUDA, or Triton's interpreter).

A one-row decode step is a chain of matrix-vector products bound by memory bandwidth. Inductor turns
them into fused reductions, and for the narrow projections that loses bandwidth (bench/qwen_profile.py on
an H200: down at 3.05 TB/s, o at ~2 TB/s, q|k|v through cuBLAS at 2.95 TB/s, against 4.2 TB/s for
gate|up). Two causes: inductor recomputes the producer of the vector (SiLU(gate) * up, 75 KB) inside
every output row's program, and a 3584-row output has too few rows to keep 132 SMs reading.

Here the vector is a materialised input, and the reduction over K can be split across programs: with
`split` > 1 each writes fp32 partial sums for its block of rows and a second small kernel adds the `split`
partials in a fixed order, adds the bias and casts (deterministic; the result differs from cuBLAS's only by
fp32 summation order). The op returns the finished vector: handing the partials to inductor would let it
fuse their sum into the next layer's RMSNorm, recomputed in every program of the next projection.

`TUNED` holds the configs `bench/gemv.py` measured fastest on an H200, for the shapes where this kernel
beat inductor's reduction there (CUDA-graph replays over enough layers' weights that none sits in L2).
Every other shape keeps F.linear.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear everywhere
    triton = None


class Config(NamedTuple):
    block_n: int
    block_k: int
    split: int
    warps: int


# (out_features, in_features) -> Config, from bench/gemv.py on an H200 (docs/PERFORMANCE.md, "split-K").
TUNED: dict[tuple[int, int], Config] = {}


def config_for(n: int, k: int) -> Config | None:
    """The measured config of an (n, k) weight, None where inductor's reduction was as fast or faster."""
    return TUNED.get((n, k))


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on t's device (the interpreter runs it on the CPU, for tests)."""
    if triton is None:
        return False
    import os

    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
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

    @triton.jit
    def _finish_kernel(partials_ptr, bias_ptr, out_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT):  # a fixed order: the same sums every run
            y += tl.load(partials_ptr + s * N + rows, mask=ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=ok)

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
            torch.library.wrap_triton(_finish_kernel)[(-(-n // 1024),)](
                target, bias if has_bias else target, out, n, SPLIT=split, BLOCK=1024, HAS_BIAS=has_bias,
                num_warps=4)
        return out


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """weight @ x (+ bias) for a 1-D, contiguous x at config cfg."""
    return torch.ops.genq.gemv(x, weight, bias, cfg.split, cfg.block_n, cfg.block_k, cfg.warps)


def linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """F.linear for a single row (h's leading dims multiply to 1) through the kernel, at `config` or the
    measured one for this weight shape; any other input, shape or device takes F.linear."""
    cfg = config or config_for(*weight.shape)
    if cfg is None or h.numel() != h.shape[-1] or not weight.is_contiguous() or not available(h):
        return F.linear(h, weight, bias)
    return product(h.reshape(-1).contiguous(), weight, bias, cfg).view(*h.shape[:-1], weight.shape[0])
