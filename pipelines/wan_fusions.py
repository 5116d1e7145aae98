"""Fusions for WAN's blocks that inductor does not find on its own (exact: bf16 rounding apart).

A compiled WAN guided step at 480x832x81 spends about 0.1 s outside attention and the products
(docs/PERFORMANCE.md, FlashAttention-4 profile), a tenth of the step. Its largest parts:
- The query and key norm and rotary embedding, 23 ms a step: inductor's kernel loops twice over each
  1536-channel row (RMSNorm across heads) and gathers RoPE's channel pairs in float64 (diffusers keeps the
  rotary table in float64). `qk_norm_rope` is one Triton pass from the fused q|k|v product to the
  normalised, rotated queries and keys: each row read once and written once.
- The feed-forward's tanh GELU, 25 ms a step: a separate pass over 32,760 x 8,960 values. `GeluLinear`
  computes it in the product's epilogue instead (cuBLASLt's GELU epilogue, `torch._addmm_activation`,
  which is the tanh form on CUDA).
- The three layer norms with their residual adds and modulation, 32 ms a step: inductor's kernels move
  1.1-2.4 TB/s, reading each 1536-channel row twice. `fused_block_forward` is diffusers' block forward with
  each of them as one Triton pass (`residual_norm`), a row held in registers.

`accel.accelerate_wan` applies them on CUDA unless GENQ_WAN_FUSE=0. Importing this module needs Triton
(it comes with CUDA builds of torch); the tests run the kernels on a CPU through Triton's interpreter.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import types
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from diffusers.models.activations import GELU
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn
from torch.library import triton_op, wrap_triton

log = logging.getLogger(__name__)


class Launch(NamedTuple):
    """A row kernel's launch shape: token rows per program, warps per program."""
    rows: int
    warps: int


# Read when a block is traced; bench/wan_norms.py sweeps the alternatives at WAN's shape. On an H200 one
# row and 2 warps ran the three norm passes in 51.5, 97.9 and 99.0 us (4 TB/s for the residual ones),
# against 75.6, 101.1 and 99.6 with 8 warps; more rows a program gained nothing for either kernel.
NORM_ROPE = Launch(rows=1, warps=4)
RESIDUAL_NORM = Launch(rows=1, warps=2)


@triton.jit
def _norm_rope_kernel(X, W, Cos, Sin, Out, eps, n_rows, tokens, sx_row, sc_tok, ss_tok,
                      C: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr, ROWS: tl.constexpr):
    """ROWS tokens' C channels of X: RMSNorm over all C (weight W), then RoPE on each head's interleaved
    channel pairs with the token's cos/sin row. Rounded to X's dtype where aten's rms_norm rounds. Rows are
    read and written whole, as [pairs, 2], and split into the pairs' halves in registers."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None, None]
    tok = row % tokens
    channel = 2 * tl.arange(0, PAIRS)[None, :, None] + tl.arange(0, 2)[None, None, :]  # [1, PAIRS, 2]
    live = (channel < C) & (row < n_rows)
    x = tl.load(X + row * sx_row + channel, mask=live, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / C + eps)[:, None, None]
    dtype = Out.dtype.element_ty
    w = tl.load(W + channel, mask=channel < C, other=0.0).to(tl.float32)
    y1, y2 = tl.split(((x * rstd).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32))
    d = channel % D  # channel within the head; diffusers' table repeats each angle for both of a pair
    cos, _ = tl.split(tl.load(Cos + tok * sc_tok + d, mask=live, other=0.0).to(tl.float32))
    _, sin = tl.split(tl.load(Sin + tok * ss_tok + d, mask=live, other=0.0).to(tl.float32))
    out = tl.join(y1 * cos - y2 * sin, y1 * sin + y2 * cos)
    tl.store(Out + row * C + channel, out.to(dtype), mask=live)


@triton_op("genq::wan_qk_norm_rope", mutates_args=())
def _qk_norm_rope(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, width = qkv.shape
    c = width // 3
    rows = qkv.reshape(batch * tokens, width)
    n, launch = rows.shape[0], NORM_ROPE
    outs = []
    for part, weight in enumerate((wq, wk)):
        out = torch.empty((batch, tokens, c), device=qkv.device, dtype=qkv.dtype)
        if n:
            wrap_triton(_norm_rope_kernel)[(triton.cdiv(n, launch.rows),)](
                rows[:, part * c:], weight, cos, sin, out, eps, n, tokens, rows.stride(0), cos.stride(1),
                sin.stride(1), C=c, D=head_dim, PAIRS=triton.next_power_of_2(c // 2), ROWS=launch.rows,
                num_warps=launch.warps)
        outs.append(out)
    return outs[0], outs[1]


def takes(attn, hidden_states: torch.Tensor, rotary_emb) -> bool:
    """Whether `qk_norm_rope` computes this self-attention's queries and keys: 16-bit CUDA activations and
    a layer `fits`."""
    return (hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16)
            and fits(attn, hidden_states.shape[1], rotary_emb))


def fits(attn, tokens: int, rotary_emb) -> bool:
    """A fused q|k|v product, RMSNorm across heads with weights, and a rotary table of [1, tokens, 1,
    head_dim] (each angle repeated for both channels of a pair, as diffusers builds it)."""
    if rotary_emb is None or not attn.fused_projections:
        return False
    c = attn.to_qkv.weight.shape[0] // 3
    head_dim = c // attn.heads
    return (all(type(n) is nn.RMSNorm and n.weight is not None and tuple(n.normalized_shape) == (c,)
                for n in (attn.norm_q, attn.norm_k))
            and head_dim % 2 == 0 and head_dim * attn.heads == c
            and all(t.dim() == 4 and t.shape[0] == 1 and t.shape[1] == tokens and t.shape[2] == 1
                    and t.shape[3] == head_dim and t.stride(3) == 1 for t in rotary_emb))


def qk_norm_rope(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """(query, key, value) as [batch, tokens, heads, head_dim] for a self-attention `takes` accepts: one
    product, then the norms and rotary embedding of diffusers' WanAttnProcessor in one kernel."""
    qkv = attn.to_qkv(hidden_states)
    c = qkv.shape[-1] // 3
    eps = attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(qkv.dtype).eps
    query, key = _qk_norm_rope(qkv, attn.norm_q.weight, attn.norm_k.weight, *rotary_emb, eps, c // attn.heads)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, qkv[..., 2 * c:]))


class GeluLinear(nn.Module):
    """diffusers' GELU(approximate="tanh") feed-forward input (`proj`, then the activation), with the
    activation in the product's epilogue on CUDA. Elsewhere, or once `proj` is no plain nn.Linear (FP8
    products, GENQ_WAN_LINEAR=fp8), it computes as diffusers' module does."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        if type(proj) is not nn.Linear or proj.bias is None or not hidden_states.is_cuda:
            return nn.functional.gelu(proj(hidden_states), approximate="tanh")
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = torch._addmm_activation(proj.bias, rows, proj.weight.t(), use_gelu=True)
        return out.view(*hidden_states.shape[:-1], out.shape[-1])


def gelu_in_epilogue(transformer) -> int:
    """Every block's tanh-GELU feed-forward input (VACE's hint blocks too) becomes a GeluLinear; returns how
    many."""
    swapped = 0
    for block in [*transformer.blocks, *getattr(transformer, "vace_blocks", ())]:
        first = block.ffn.net[0]
        if type(first) is GELU and first.approximate == "tanh":
            block.ffn.net[0] = GeluLinear(first.proj)
            swapped += 1
    return swapped


@triton.jit
def _residual_norm_kernel(X, A, Gate, W, B, Scale, Shift, OutX, OutY, eps, n_rows, tokens, s_gate, s_scale, s_shift,
                          C: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr,
                          GATED: tl.constexpr, AFFINE: tl.constexpr, MODULATED: tl.constexpr):
    """ROWS tokens' rows: with RESIDUAL x + a (a scaled by the video's gate if GATED) rounded to x's dtype
    and stored, then a LayerNorm of it in fp32 (weight and bias if AFFINE), times (1 + scale) plus shift if
    MODULATED, rounded to x's dtype: what diffusers' WanTransformerBlock computes in fp32 between products."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    video = row // tokens
    c = tl.arange(0, BLOCK)[None, :]
    live = (c < C) & (row < n_rows)
    x = tl.load(X + row * C + c, mask=live, other=0.0).to(tl.float32)
    if RESIDUAL:
        a = tl.load(A + row * C + c, mask=live, other=0.0).to(tl.float32)
        if GATED:
            a = a * tl.load(Gate + video * s_gate + c, mask=live, other=0.0)
        rounded = (x + a).to(OutX.dtype.element_ty)
        tl.store(OutX + row * C + c, rounded, mask=live)
        x = rounded.to(tl.float32)
    mean = tl.sum(x, axis=1)[:, None] / C
    centred = tl.where(live, x - mean, 0.0)
    y = centred * tl.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)[:, None]
    if AFFINE:
        y = y * tl.load(W + c, mask=c < C, other=0.0).to(tl.float32) + tl.load(B + c, mask=c < C, other=0.0).to(tl.float32)
    if MODULATED:
        scale = tl.load(Scale + video * s_scale + c, mask=live, other=0.0)
        y = y * (1 + scale) + tl.load(Shift + video * s_shift + c, mask=live, other=0.0)
    tl.store(OutY + row * C + c, y.to(OutY.dtype.element_ty), mask=live)


def _launch(x, a, gate, weight, bias, scale, shift, eps, out_x):
    batch, tokens, c = x.shape
    out_y = torch.empty_like(x)
    n, launch = batch * tokens, RESIDUAL_NORM
    if n:
        pointers = (t if t is not None else x for t in (a, gate, weight, bias, scale, shift, out_x))  # unread if None
        wrap_triton(_residual_norm_kernel)[(triton.cdiv(n, launch.rows),)](
            x, *pointers, out_y, eps, n, tokens,
            *(t.stride(0) if t is not None else 0 for t in (gate, scale, shift)),
            C=c, BLOCK=triton.next_power_of_2(c), ROWS=launch.rows, RESIDUAL=a is not None, GATED=gate is not None,
            AFFINE=weight is not None, MODULATED=scale is not None, num_warps=launch.warps)
    return out_y


@triton_op("genq::wan_norm", mutates_args=())
def _norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
          shift: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _launch(x, None, None, weight, bias, scale, shift, eps, None)


@triton_op("genq::wan_residual_norm", mutates_args=())
def _residual_norm(x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out_x = torch.empty_like(x)
    return out_x, _launch(x, a, gate, weight, bias, scale, shift, eps, out_x)


def residual_norm(norm, x: torch.Tensor, a: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
    """diffusers' `norm(x.float())` after the residual `x + a * gate` (if `a`), times (1 + scale) plus shift
    (if given), in x's dtype: (new x, normed) with `a`, else normed. gate, scale, shift: [videos, 1, C]."""
    vectors = [t if t is None else t.float() for t in (gate, scale, shift)]
    args = (norm.weight, norm.bias, *vectors[1:], norm.eps)
    if a is None:
        return _norm(x.contiguous(), *args)
    return _residual_norm(x.contiguous(), a.contiguous(), vectors[0], *args)


def _fused_fits(block, hidden_states: torch.Tensor, temb: torch.Tensor) -> bool:
    c = hidden_states.shape[-1]
    return (hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16) and temb.ndim == 3
            and all(type(n) is FP32LayerNorm and tuple(n.normalized_shape) == (c,)
                    and (n.weight is None) == (n.bias is None) for n in (block.norm1, block.norm2, block.norm3)))


def fused_block_forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """diffusers 0.42's WanTransformerBlock.forward with each norm, its residual add and its modulation as
    one `residual_norm` pass; blocks and inputs it does not fit (per-token modulation of WAN 2.2's 5B, no
    cross-attention norm, a CPU) run diffusers' forward."""
    if not _fused_fits(block, hidden_states, temb):
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        block.scale_shift_table + temb.float()).chunk(6, dim=1)
    normed = residual_norm(block.norm1, hidden_states, scale=scale_msa, shift=shift_msa)
    attn_output = block.attn1(normed, None, None, rotary_emb)
    hidden_states, normed = residual_norm(block.norm2, hidden_states, attn_output, gate_msa)
    attn_output = block.attn2(normed, encoder_hidden_states, None, None)
    hidden_states, normed = residual_norm(block.norm3, hidden_states, attn_output, scale=c_scale_msa,
                                          shift=c_shift_msa)
    ff_output = block.ffn(normed)
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


# sha256 (first 16 hex digits) of the source of diffusers 0.42's WanTransformerBlock.forward, which
# fused_block_forward restates: a diffusers whose block computes anything else keeps its own forward.
MIRRORED_FORWARD = "21c15441b009932c"


def mirrors_diffusers() -> bool:
    """Whether the installed diffusers' WanTransformerBlock.forward is the one fused_block_forward restates."""
    try:
        source = inspect.getsource(WanTransformerBlock.forward)
    except (OSError, TypeError):  # no source shipped: nothing to compare with
        return False
    return hashlib.sha256(source.encode()).hexdigest()[:16] == MIRRORED_FORWARD


def fuse_block_norms(transformer) -> int:
    """Every WanTransformerBlock (not VACE's hint blocks, whose forward differs) runs fused_block_forward;
    returns how many: none unless `mirrors_diffusers()`. Before any hook (the step cache wraps whatever
    forward a block has)."""
    if not mirrors_diffusers():
        log.warning("diffusers' WanTransformerBlock.forward is not the one pipelines/wan_fusions.py restates: "
                    "its blocks keep diffusers' forward (the layer-norm fusion is off)")
        return 0
    fused = 0
    for block in transformer.blocks:
        if type(block) is WanTransformerBlock and "forward" not in vars(block):
            block.forward = types.MethodType(fused_block_forward, block)
            fused += 1
    return fused
