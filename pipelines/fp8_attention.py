"""Attention with 8-bit products (int8 Q K^T, float8 e4m3 P V), for WAN's self-attention.

A WAN 2.1 1.3B guided step at 480x832x81 spends 56-70% of its time in self-attention over 32,760 tokens,
which cuDNN's bf16 flash kernel already runs at 540-580 TFLOP/s (docs/PERFORMANCE.md); the GPU image has
no faster exact kernel. Hopper's tensor cores multiply int8 and e4m3 at twice the bf16 rate, so this
module computes softmax(Q K^T / sqrt(d)) V with both products in 8 bits, an approximation whose
difference bench/fp8_attention.py and bench/wan.py measure (GENQ_WAN_ATTENTION=fp8, opt-in, docs/WAN.md).

What keeps the error small, following SageAttention (int8 Q K^T) and FlashAttention-3's FP8 mode (P V):
- K is "smoothed" first: its mean over the tokens is subtracted, per head and channel. That changes every
  score of one query by the same amount, which softmax ignores, and leaves K centred, so its scale is
  not set by a shared offset.
- Q and K in int8 by default: a step of amax/127 for every value, where e4m3's 3 mantissa bits gave
  2.6x the error on sharp softmaxes (bench/fp8_attention.py, `qk="fp8"` kept for that comparison).
- Q has a scale per token, K one per block of KB tokens, V one per channel; the kernel folds them into
  the fp32 scores (Q, K) and the output (V).
- The probabilities are scaled by 448 (e4m3's largest value) before their cast, so small ones keep
  normal e4m3 precision; the running sum in fp32 carries the same factor, which cancels.
- Each block's P V product starts from zero and is added to the fp32 accumulator.

`attention(q, k, v)` takes diffusers' layout ([batch, tokens, heads, head_dim], bf16 or fp16) and returns
the same. Quantisation is plain torch (inductor fuses it into the producers when compiled); the product
is one Triton kernel, a torch custom op so compiled graphs call it as one node. Importing needs Triton.
tests/test_fp8_attention.py runs the kernel on a CPU through Triton's interpreter.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
KB = 256  # tokens per K scale, and the padding of every token axis
LOG2E = 1.4426950408889634


class Config(NamedTuple):
    block_m: int = 64  # queries per program
    block_n: int = 128  # keys per step; divides KB
    warps: int = 4
    stages: int = 3


class Quantised(NamedTuple):
    q: torch.Tensor  # [B, H, S_pad, D] e4m3
    q_scale: torch.Tensor  # [B, H, S_pad] fp32, softmax scale and log2(e) folded in
    k: torch.Tensor  # [B, H, S_pad, D] e4m3, smoothed
    k_scale: torch.Tensor  # [B, H, S_pad / KB] fp32
    v: torch.Tensor  # [B, H, D, S_pad] e4m3, tokens contiguous (the FP8 product's operand layout)
    v_scale: torch.Tensor  # [B, H, D] fp32


QK_TYPES = {"int8": (torch.int8, 127.0), "fp8": (FP8, FP8_MAX)}


def _scaled(x: torch.Tensor, amax: torch.Tensor, kind: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """x / (amax / top) as `kind` (int8 rounds to nearest), and that scale; amax broadcasts against x."""
    dtype, top = QK_TYPES[kind]
    scale = amax.clamp_min(1e-12) / top
    y = (x / scale).clamp(-top, top)
    return (y.round() if dtype == torch.int8 else y).to(dtype), scale


def quantise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
             qk: str = "int8") -> Quantised:
    """The kernel's operands from diffusers-layout q, k, v ([B, S, H, D]); token axes padded to KB. `qk`:
    the type of Q and K, int8 (a step of amax/127 for every value) or fp8 (3 mantissa bits)."""
    s, d = q.shape[1], q.shape[-1]
    pad = (0, 0, 0, -s % KB)
    qf, kf, vf = (F.pad(t.transpose(1, 2).float(), pad) for t in (q, k, v))  # [B, H, S_pad, D]
    kf = kf - kf[:, :, :s].mean(dim=2, keepdim=True)  # smoothing: one shift per query's scores
    kf[:, :, s:] = 0  # padded keys stay zero (the kernel masks them)
    b, h, sp, _ = kf.shape
    q8, qs = _scaled(qf, qf.abs().amax(-1, keepdim=True), qk)
    blocks = kf.view(b, h, sp // KB, KB, d)
    k8, ks = _scaled(blocks, blocks.abs().amax((-1, -2), keepdim=True), qk)
    v8, vs = _scaled(vf, vf.abs().amax(2, keepdim=True))
    scale = (softmax_scale if softmax_scale is not None else 1 / math.sqrt(d)) * LOG2E
    return Quantised(q8, (qs.squeeze(-1) * scale).contiguous(), k8.view(b, h, sp, d), ks.view(b, h, -1).contiguous(),
                     v8.transpose(-1, -2).contiguous(), vs.view(b, h, d).contiguous())


def reference(x: Quantised, tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the kernel computes, in plain torch on the dequantised operands (P unquantised): [B, S, H, D]."""
    q = x.q.float() * x.q_scale[..., None]
    k = x.k.float() * x.k_scale.repeat_interleave(KB, dim=-1)[..., None]
    v = x.v.float().transpose(-1, -2) * x.v_scale[:, :, None, :]
    scores = (q @ k.transpose(-1, -2))[:, :, :tokens, :tokens] / LOG2E
    return (scores.softmax(-1) @ v[:, :, :tokens]).transpose(1, 2).to(dtype)


@triton.jit
def _blocks(acc, l_i, m_i, q, qs, K, V, KS, lo, hi, tokens, s_kn, s_vd, offs_n, offs_d, BLOCK_N: tl.constexpr,
            KBLOCK: tl.constexpr, MASK: tl.constexpr, QK_INT8: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        k = tl.load(K + n[:, None] * s_kn + offs_d[None, :])
        if QK_INT8:  # exact int32 sums
            scores = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * (qs * tl.load(KS + start // KBLOCK))[:, None]
        if MASK:  # only the last blocks hold padded keys
            scores = tl.where(n[None, :] < tokens, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # 2^(8.807) = 448: probabilities span e4m3's range, so small ones keep 3 mantissa bits
        p = tl.math.exp2(scores - m_new[:, None] + 8.807354922057604)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_d[None, :] * s_vd + n[:, None])  # [BLOCK_N, D] from the tokens-contiguous copy
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # a fresh FP8 sum per block, added in fp32
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(Q, QS, K, KS, V, VS, Out, tokens, padded, s_ob, s_oh, s_os, heads,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KBLOCK: tl.constexpr,
                      QK_INT8: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) against every key, online softmax in fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    Q += bh * padded * HEAD_DIM
    K += bh * padded * HEAD_DIM
    V += bh * padded * HEAD_DIM
    KS += bh * (padded // KBLOCK)
    q = tl.load(Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    qs = tl.load(QS + bh * padded + offs_m)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    whole = (tokens // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _blocks(acc, l_i, m_i, q, qs, K, V, KS, 0, whole, tokens, HEAD_DIM, padded, offs_n, offs_d,
                            BLOCK_N, KBLOCK, False, QK_INT8)
    acc, l_i, m_i = _blocks(acc, l_i, m_i, q, qs, K, V, KS, whole, padded, tokens, HEAD_DIM, padded, offs_n,
                            offs_d, BLOCK_N, KBLOCK, True, QK_INT8)
    acc = acc / l_i[:, None] * tl.load(VS + bh * HEAD_DIM + offs_d)[None, :]
    b = bh // heads
    h = bh % heads
    out = Out + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < tokens)


@triton_op("genq::fp8_attention", mutates_args={})
def _fp8_attention(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, v: torch.Tensor,
                   v_scale: torch.Tensor, tokens: int, out_dtype: torch.dtype, block_m: int, block_n: int, warps: int,
                   stages: int) -> torch.Tensor:
    b, h, padded, d = q.shape
    out = torch.empty((b, tokens, h, d), device=q.device, dtype=out_dtype)
    wrap_triton(_attention_kernel)[(padded // block_m, b * h)](
        q, q_scale, k, k_scale, v, v_scale, out, tokens, padded, out.stride(0), out.stride(2), out.stride(1), h,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, KBLOCK=KB, QK_INT8=q.dtype == torch.int8,
        num_warps=warps, num_stages=stages)
    return out


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these inputs cannot take the FP8 path, or None: self-attention shapes only (as many keys as
    queries, one head count), a power-of-two head dim from 16 to 256, a 16-bit float dtype."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        return f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} are not one self-attention shape"
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two from 16 to 256"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not bf16 or fp16"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
              cfg: Config = Config(), qk: str = "int8") -> torch.Tensor:
    """softmax(q k^T * scale) v over diffusers-layout [B, S, H, D] tensors: Q K^T in `qk` (int8 or fp8),
    P V in e4m3."""
    why = supported(q, k, v)
    if why:
        raise ValueError(f"fp8_attention: {why}")
    if KB % cfg.block_n or KB % cfg.block_m:
        raise ValueError(f"fp8_attention: blocks {cfg.block_m}x{cfg.block_n} must divide {KB}")
    x = quantise(q, k, v, softmax_scale, qk)
    return torch.ops.genq.fp8_attention(*x, q.shape[1], q.dtype, *cfg)
