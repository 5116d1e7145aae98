"""Decode attention split over the cache length ("flash-decoding"): two Triton kernels for the chat
engine's decode step (pipelines/decoder.py, GENQ_CHAT_ATTENTION=split; "auto" picks it on CUDA).

A decode step has one query per row. The fused SDPA kernels give each (row, key/value head) one thread
block that walks the whole cache: 16 rows x 4 heads keep 64 of an H100's 132 SMs busy, one row 4, and
each block reads its slice at one SM's share of the bandwidth (16 rows x 1024 columns: 26 us a layer for
0.9 GB a step, bench/qwen_profile.py). Here each (row, key/value head) gets `splits` blocks, each over a
slice of the cache, with the grouped query heads of that key/value head together so the cache is read
once; a second kernel merges the slices. Scores and softmax in fp32, as the fused kernels keep them; the
weights meet the values in the cache's dtype, as there.

Importing this module needs Triton (it comes with CUDA builds of torch); decoder.py imports it only
where CUDA is available. The tests run the kernels on a CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


class Config(NamedTuple):
    """The kernels' launch shape. The defaults came within 4% of the best of 36 configs at each of the
    engine's shapes (1 and 16 rows, 2048 and 4096 columns) on an H100 (bench/decode_attention.py)."""
    block: int = 128  # cache columns per inner step
    per_sm: int = 4  # blocks per SM the cache is split into (most skip the columns nothing lives in)
    warps: int = 8
    stages: int = 2


CONFIG = Config()  # bench/decode_attention.py sweeps the alternatives; read when a step is traced
_SMS: dict[torch.device, int] = {}


def supported(head_dim: int, rep: int) -> bool:
    """Shapes the kernels take: a power-of-two head size up to 128 (tl.arange; a block of 128 columns of
    keys and values fits shared memory) and up to 16 grouped query heads (one padded tile of queries)."""
    return 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0 and 0 < rep <= 16


@triton.jit
def _attention_partial_kernel(Q, K, V, Keep, Acc, Max, Sum, scale, N,
                    sq_b, sq_h, sq_r, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                    KV: tl.constexpr, REP: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    """One (row, key/value head) x one slice of CHUNK columns: the slice's running max, sum of exp and
    exp-weighted sum of values for each grouped query head (online softmax, as flash attention). Steps
    with no live column are not read: a batch's cache is longer than what its rows hold."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    r = tl.arange(0, REP_PAD)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + r[:, None] * sq_r + d[None, :], mask=r[:, None] < REP, other=0.0)
    m_i = tl.full([REP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([REP_PAD], tl.float32)
    acc = tl.zeros([REP_PAD, D], tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        n = split * CHUNK + offset + tl.arange(0, BLOCK)
        inside = n < N
        live = tl.load(Keep + b * sm_b + n, mask=inside, other=0) != 0
        if tl.max(live.to(tl.int32), 0) > 0:
            k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=inside[:, None], other=0.0)
            s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # inductor passes a Python float as fp64
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing live yet: exp(-inf) = 0, not NaN
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    base = (bh * SPLITS + split) * REP_PAD
    tl.store(Acc + (base + r[:, None]) * D + d[None, :], acc)
    tl.store(Max + base + r, m_i)
    tl.store(Sum + base + r, l_i)


@triton.jit
def _attention_combine_kernel(Acc, Max, Sum, Out, so_b, so_h, so_r,
                    KV: tl.constexpr, REP: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr,
                    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, SB: tl.constexpr):
    """One query head of one row: its slices rescaled to the overall max and divided by the total; the
    values of slices with nothing live are not read."""
    pid = tl.program_id(0)
    bh = pid // REP
    r = pid % REP
    b = bh // KV
    h = bh % KV
    d = tl.arange(0, D)
    sp = tl.arange(0, SPLITS_PAD)
    maxes = tl.load(Max + (bh * SPLITS + sp) * REP_PAD + r, mask=sp < SPLITS, other=float("-inf"))
    m = tl.max(maxes, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(maxes - m_ref) * tl.load(Sum + (bh * SPLITS + sp) * REP_PAD + r, mask=sp < SPLITS,
                                                    other=0.0), 0)
    acc = tl.zeros([D], tl.float32)
    for start in range(0, SPLITS_PAD, SB):
        sb = start + tl.arange(0, SB)
        rows = (bh * SPLITS + sb) * REP_PAD + r
        w = tl.exp(tl.load(Max + rows, mask=sb < SPLITS, other=float("-inf")) - m_ref)
        part = tl.load(Acc + rows[:, None] * D + d[None, :], mask=(w > 0)[:, None], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
    tl.store(Out + b * so_b + h * so_h + r * so_r + d, (acc / total).to(Out.dtype.element_ty))


def _multiprocessors(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return _SMS[device]


def plan(rows_heads: int, length: int, sms: int, config: Config = Config()) -> tuple[int, int]:
    """(splits, columns per split): about `config.per_sm` blocks per SM in all, each slice a whole
    number of inner steps, no slice past the cache."""
    steps = triton.cdiv(length, config.block)
    splits = max(1, min(steps, triton.cdiv(config.per_sm * sms, rows_heads)))
    chunk = triton.cdiv(steps, splits) * config.block
    return triton.cdiv(length, chunk), chunk


@triton_op("genq::split_kv_attention", mutates_args=())
def split_kv_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """q [rows, kv heads, grouped heads, head dim] over keys/values [rows, kv heads, columns, head dim]
    where `keep` [rows, 1, 1, columns] is true; returns [rows, kv heads, grouped heads, head dim]."""
    rows, kv_heads, rep, dim = q.shape
    length = keys.shape[2]
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        q, keys, values = q.contiguous(), keys.contiguous(), values.contiguous()
    live = keep.reshape(rows, length)
    rep_pad = max(16, triton.next_power_of_2(rep))
    cfg = CONFIG
    splits, chunk = plan(rows * kv_heads, length, _multiprocessors(q.device), cfg)
    parts = rows * kv_heads * splits * rep_pad
    acc = torch.empty((parts, dim), dtype=torch.float32, device=q.device)
    maxes = torch.empty(parts, dtype=torch.float32, device=q.device)
    sums = torch.empty(parts, dtype=torch.float32, device=q.device)
    out = torch.empty((rows, kv_heads, rep, dim), dtype=q.dtype, device=q.device)
    wrap_triton(_attention_partial_kernel)[(rows * kv_heads, splits)](
        q, keys, values, live, acc, maxes, sums, scaling, length,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), live.stride(0),
        KV=kv_heads, REP=rep, REP_PAD=rep_pad, D=dim, CHUNK=chunk, BLOCK=cfg.block, SPLITS=splits,
        num_warps=cfg.warps, num_stages=cfg.stages)
    splits_pad = triton.next_power_of_2(splits)
    wrap_triton(_attention_combine_kernel)[(rows * kv_heads * rep,)](
        acc, maxes, sums, out, out.stride(0), out.stride(1), out.stride(2),
        KV=kv_heads, REP=rep, REP_PAD=rep_pad, D=dim, SPLITS=splits, SPLITS_PAD=splits_pad,
        SB=min(16, splits_pad), num_warps=4)
    return out
