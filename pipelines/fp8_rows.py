"""Activations to float8 e4m3 with one scale per row, in one pass (Triton), for fp8_linear.scaled_mm.

torch's version (amax per row, then divide and cast) reads the activations twice and, compiled inside
WAN's blocks, cost more than the e4m3 product saved: at 32,760 x 8960 (the feed-forward's second input)
quantising and multiplying took 1.45 ms against 1.19 ms for bf16 cuBLAS alone on an H200, the product
itself 0.67 ms (bench/fp8_gemm.py). Here each program holds a whole row in registers, finds its largest
magnitude, and writes the row in e4m3 (scaled so that value becomes 448, saturating) and its fp32 scale:
one read, one write. Same arithmetic as fp8_linear.quantise_rows_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .fp8_linear import FP8, FP8_MAX

MAX_K = 32768  # longest row one program holds (Qwen 2.5 7B's widest input is 18,944)


@triton.jit
def _rows_kernel(X, Q, S, K, sx, TOP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    ok = k < K
    x = tl.load(X + row * sx + k, mask=ok, other=0.0).to(tl.float32)
    step = tl.maximum(tl.max(tl.abs(x), 0) / TOP, 1e-12)  # a row of zeros keeps a tiny scale, not NaN
    tl.store(Q + row * K + k, (x / step).to(Q.dtype.element_ty), mask=ok)
    tl.store(S + row, step)


def _layout_ok(rows: torch.Tensor) -> bool:
    return rows.dim() == 2 and rows.stride(1) == 1 and 0 < rows.shape[1] <= MAX_K


def supported(rows: torch.Tensor) -> bool:
    """2-D CUDA rows, each contiguous, no longer than MAX_K, in a floating dtype."""
    return rows.is_cuda and _layout_ok(rows) and rows.dtype in (torch.bfloat16, torch.float16, torch.float32)


@triton_op("genq::quantise_rows", mutates_args={})
def _quantise_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = rows.shape
    quantised = torch.empty((m, k), device=rows.device, dtype=FP8)
    scale = torch.empty((m, 1), device=rows.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    if m:
        # about 16 values a thread: 4 warps for 1536, 16 for 8960
        wrap_triton(_rows_kernel)[(m,)](rows, quantised, scale, k, rows.stride(0), TOP=FP8_MAX, BLOCK=block,
                                        num_warps=max(1, min(16, block // 512)))
    return quantised, scale


def quantise_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows [M, K], fp32 scale per row [M, 1]) with rows ~= quantised.float() * scale."""
    if not _layout_ok(rows):
        raise ValueError(f"quantise_rows: rows {tuple(rows.shape)} with strides {rows.stride()} not supported "
                         f"(2-D, each row contiguous, at most {MAX_K} long)")
    return _quantise_rows(rows)
