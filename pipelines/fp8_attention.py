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
the same. Two reductions over the tokens (K's mean, V's range) run in torch; one Triton kernel writes
every quantised operand, a second computes the attention; the whole is one torch custom op, so compiled
graphs call it as one node. Importing needs Triton.
tests/test_fp8_attention.py runs the kernel on a CPU through Triton's interpreter.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fp8_linear import FP8, FP8_MAX

KB = 256  # tokens per K scale, and the padding of every token axis
LOG2E = 1.4426950408889634


class Config(NamedTuple):
    block_m: int = 64  # queries per program
    block_n: int = 128  # keys per step; divides KB
    warps: int = 4
    stages: int = 3


class Quantised(NamedTuple):
    q: torch.Tensor  # [B, H, S_pad, D] int8 (or e4m3, qk="fp8")
    q_scale: torch.Tensor  # [B, H, S_pad] fp32, softmax scale and log2(e) folded in
    k: torch.Tensor  # [B, H, S_pad, D] as q, smoothed
    k_scale: torch.Tensor  # [B, H, S_pad / KB] fp32
    v: torch.Tensor  # [B, H, D, S_pad] e4m3, tokens contiguous (the FP8 product's operand layout)
    v_scale: torch.Tensor  # [B, H, D] fp32


QK_TYPES = {"int8": (torch.int8, 127.0), "fp8": (FP8, FP8_MAX)}
CHUNK = 64  # tokens the quantisation kernel holds at once


@triton.jit
def _quantise_kernel(Q, K, V, KMean, VScale, Q8, QS, K8, KS, V8, tokens, padded, sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
                     sv_b, sv_s, sv_h, heads, softmax_scale, QK_TOP: tl.constexpr, QK_INT8: tl.constexpr,
                     HEAD_DIM: tl.constexpr, KBLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """One program: KBLOCK tokens of one (batch, head). Q per token, K (minus its mean) per block, V by its
    per-channel scale into the tokens-contiguous copy; padded tokens become zeros."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, HEAD_DIM)
    mean = tl.load(KMean + bh * HEAD_DIM + d)
    v_scale = tl.load(VScale + bh * HEAD_DIM + d)
    k_amax = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    for c in range(0, KBLOCK, CHUNK):  # pass 1: Q and V, which need no block-wide scale, and K's amax
        t = blk * KBLOCK + c + tl.arange(0, CHUNK)
        live = (t < tokens)[:, None]
        q = tl.load(Q + b * sq_b + h * sq_h + t[:, None] * sq_s + d[None, :], mask=live, other=0.0).to(tl.float32)
        q_step = tl.maximum(tl.max(tl.abs(q), 1), 1e-12) / QK_TOP
        q = tl.minimum(tl.maximum(q / q_step[:, None], -QK_TOP), QK_TOP)
        if QK_INT8:
            q = tl.floor(q + 0.5)
        tl.store(Q8 + bh * padded * HEAD_DIM + t[:, None] * HEAD_DIM + d[None, :], q.to(Q8.dtype.element_ty))
        tl.store(QS + bh * padded + t, q_step * softmax_scale)
        v = tl.load(V + b * sv_b + h * sv_h + t[:, None] * sv_s + d[None, :], mask=live, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(v / v_scale[None, :], -448.0), 448.0)
        tl.store(V8 + bh * HEAD_DIM * padded + d[None, :] * padded + t[:, None], v.to(V8.dtype.element_ty))
        k = tl.load(K + b * sk_b + h * sk_h + t[:, None] * sk_s + d[None, :], mask=live, other=0.0).to(tl.float32)
        k_amax = tl.maximum(k_amax, tl.max(tl.where(live, tl.abs(k - mean[None, :]), 0.0), 0))
    k_step = tl.maximum(tl.max(k_amax, 0), 1e-12) / QK_TOP
    tl.store(KS + bh * (padded // KBLOCK) + blk, k_step)
    for c in range(0, KBLOCK, CHUNK):  # pass 2: K on the block's scale (its chunks are in L2 by now)
        t = blk * KBLOCK + c + tl.arange(0, CHUNK)
        live = (t < tokens)[:, None]
        k = tl.load(K + b * sk_b + h * sk_h + t[:, None] * sk_s + d[None, :], mask=live, other=0.0).to(tl.float32)
        k = tl.where(live, (k - mean[None, :]) / k_step, 0.0)
        k = tl.minimum(tl.maximum(k, -QK_TOP), QK_TOP)
        if QK_INT8:
            k = tl.floor(k + 0.5)
        tl.store(K8 + bh * padded * HEAD_DIM + t[:, None] * HEAD_DIM + d[None, :], k.to(K8.dtype.element_ty))


def quantise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
             qk: str = "int8") -> Quantised:
    """The kernel's operands from diffusers-layout q, k, v ([B, S, H, D], last axis contiguous); token axes
    padded to KB. `qk`: the type of Q and K, int8 (a step of amax/127 for every value) or fp8 (3 mantissa
    bits). K's mean and V's per-channel range are reductions over the tokens in their own layout (one read
    each); one kernel then writes every operand."""
    b, s, h, d = q.shape
    padded = triton.cdiv(s, KB) * KB
    dtype, top = QK_TYPES[qk]
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()  # [B, H, D]: smoothing, one shift per query
    v_scale = (v.abs().amax(dim=1).float().clamp_min(1e-12) / FP8_MAX).contiguous()
    q8 = torch.empty((b, h, padded, d), device=q.device, dtype=dtype)
    k8 = torch.empty_like(q8)
    v8 = torch.empty((b, h, d, padded), device=q.device, dtype=FP8)
    qs = torch.empty((b, h, padded), device=q.device, dtype=torch.float32)
    ks = torch.empty((b, h, padded // KB), device=q.device, dtype=torch.float32)
    scale = (softmax_scale if softmax_scale is not None else 1 / math.sqrt(d)) * LOG2E
    _quantise_kernel[(padded // KB, b * h)](
        q, k, v, k_mean, v_scale, q8, qs, k8, ks, v8, s, padded, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), h, scale, QK_TOP=top,
        QK_INT8=dtype == torch.int8, HEAD_DIM=d, KBLOCK=KB, CHUNK=CHUNK, num_warps=4)
    return Quantised(q8, qs, k8, ks, v8, v_scale)


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
        scale = qs * tl.load(KS + start // KBLOCK)  # per query, positive: the row maximum commutes with it
        if MASK:  # only the last blocks hold padded keys
            scores = tl.where(n[None, :] < tokens, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1) * scale)
        # one multiply-add per score before exp2; 2^(8.807) = 448 spreads the probabilities over e4m3's
        # range, so small ones keep 3 mantissa bits
        p = tl.math.exp2(scores * scale[:, None] - (m_new - 8.807354922057604)[:, None])
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


def product(x: Quantised, tokens: int, out_dtype: torch.dtype, cfg: Config = Config()) -> torch.Tensor:
    """The attention kernel on quantised operands: [B, tokens, H, D] of out_dtype."""
    b, h, padded, d = x.q.shape
    out = torch.empty((b, tokens, h, d), device=x.q.device, dtype=out_dtype)
    _attention_kernel[(padded // cfg.block_m, b * h)](
        x.q, x.q_scale, x.k, x.k_scale, x.v, x.v_scale, out, tokens, padded, out.stride(0), out.stride(2),
        out.stride(1), h, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, KBLOCK=KB,
        QK_INT8=x.q.dtype == torch.int8, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


# One opaque op for compiled graphs: quantising in plain torch inside WAN's compiled blocks let inductor
# fuse the token-axis reductions into RoPE and the norms as strided loops, and a step took 3.4x as long
# as the exact path's (docs/PERFORMANCE.md, seventh session).
@torch.library.custom_op("genq::fp8_attention", mutates_args=())
def _fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, qk: str, block_m: int,
                   block_n: int, warps: int, stages: int) -> torch.Tensor:
    # the quantisation kernel reads any strides but needs each token's channels contiguous
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    x = quantise(q, k, v, softmax_scale, qk)
    return product(x, q.shape[1], q.dtype, Config(block_m, block_n, warps, stages))


@_fp8_attention.register_fake
def _(q, k, v, softmax_scale, qk, block_m, block_n, warps, stages):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


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
    if qk not in QK_TYPES:
        raise ValueError(f"fp8_attention: qk {qk!r} is not one of {sorted(QK_TYPES)}")
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    return torch.ops.genq.fp8_attention(q, k, v, scale, qk, *cfg)
