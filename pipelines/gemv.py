"""Split-K matrix-vector products for the one-row decode step (Triton; CUDA, or Triton's interpreter).

A one-row decode step is a chain of matrix-vector products bound by memory bandwidth. Inductor turns
them into fused reductions, and for the narrow projections that loses bandwidth (bench/qwen_profile.py on
an H200: down at 3.05 TB/s, o at ~2 TB/s, q|k|v through cuBLAS at 2.95 TB/s, against 4.2 TB/s for
gate|up). Two causes: inductor recomputes the producer of the vector (SiLU(gate) * up, 75 KB) inside
every output row's program, and a 3584-row output has too few rows to keep 132 SMs reading.

Here the vector is a materialised input, and the reduction over K is split across programs: each writes
its partial sums (fp32) for a block of rows, and the caller adds the `split` partials, which inductor
fuses with what follows (bias, residual). The partials are summed in a fixed order: results are
deterministic, and differ from cuBLAS's only by fp32 summation order before the cast to bf16.

Block sizes per weight shape come from `bench/gemv.py` (a sweep on the card, CUDA-graph replays over
enough layers' weights that none sits in L2); shapes not in the table get a heuristic config.
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


# (out_features, in_features) -> Config, measured by bench/gemv.py on an H200 (docs/PERFORMANCE.md).
TUNED: dict[tuple[int, int], Config] = {}


def config_for(n: int, k: int, sms: int = 132) -> Config:
    """The tuned config of an (n, k) weight, else enough programs to fill `sms` SMs a few times over."""
    if (n, k) in TUNED:
        return TUNED[(n, k)]
    block_n, block_k = 16, 256
    row_blocks = -(-n // block_n)
    split = 1
    while row_blocks * split < 4 * sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return Config(block_n, block_k, split, 4)


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on t's device (the interpreter runs it on the CPU, for tests)."""
    if triton is None:
        return False
    import os

    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _partials_kernel(x_ptr, w_ptr, out_ptr, N, K, K_PER_SPLIT, stride_w,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        tl.store(out_ptr + pid_k * N + rows, tl.sum(acc, axis=1), mask=row_ok)

    @torch.library.triton_op("genq::gemv_partials", mutates_args=())
    def gemv_partials(x: torch.Tensor, weight: torch.Tensor, split: int, block_n: int, block_k: int,
                      warps: int) -> torch.Tensor:
        """[split, N] fp32 partial sums of weight @ x for a 1-D x; their sum over dim 0 is the product."""
        n, k = weight.shape
        out = torch.empty((split, n), device=x.device, dtype=torch.float32)
        per_split = -(-k // split)
        per_split = -(-per_split // block_k) * block_k
        grid = (-(-n // block_n), split)
        torch.library.wrap_triton(_partials_kernel)[grid](x, weight, out, n, k, per_split, weight.stride(0),
                                                          BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
        return out


def partials(x: torch.Tensor, weight: torch.Tensor, cfg: Config) -> torch.Tensor:
    """[split, N] fp32 partial sums of weight @ x (x 1-D) at config cfg."""
    return torch.ops.genq.gemv_partials(x, weight, cfg.split, cfg.block_n, cfg.block_k, cfg.warps)


def linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """F.linear for a single row (h's leading dims multiply to 1) through the split-K kernel; any other
    input, or a device the kernel cannot run on, takes F.linear."""
    if h.numel() != h.shape[-1] or not weight.is_contiguous() or not available(h):
        return F.linear(h, weight, bias)
    n, k = weight.shape
    cfg = config or config_for(n, k)
    y = partials(h.reshape(k).contiguous(), weight, cfg).sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(h.dtype).view(*h.shape[:-1], n)
