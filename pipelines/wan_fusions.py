"""Two fusions for WAN's blocks that inductor does not find on its own (exact: bf16 rounding apart).

A compiled WAN guided step at 480x832x81 spends about 0.1 s outside attention and the products
(docs/PERFORMANCE.md, FlashAttention-4 profile), a tenth of the step. Its two largest parts:
- The query and key norm and rotary embedding, 23 ms a step: inductor's kernel loops twice over each
  1536-channel row (RMSNorm across heads) and gathers RoPE's channel pairs in float64 (diffusers keeps the
  rotary table in float64). `qk_norm_rope` is one Triton pass from the fused q|k|v product to the
  normalised, rotated queries and keys: each row read once and written once.
- The feed-forward's tanh GELU, 25 ms a step: a separate pass over 32,760 x 8,960 values. `GeluLinear`
  computes it in the product's epilogue instead (cuBLASLt's GELU epilogue, `torch._addmm_activation`,
  which is the tanh form on CUDA).

`accel.accelerate_wan` applies both on CUDA unless GENQ_WAN_FUSE=0. Importing this module needs Triton
(it comes with CUDA builds of torch); the tests run the kernel on a CPU through Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton


@triton.jit
def _norm_rope_kernel(X, W, Cos, Sin, Out, eps, tokens, sx_row, sc_tok, ss_tok,
                      C: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr):
    """One token's C channels of X: RMSNorm over all C (weight W), then RoPE on each head's interleaved
    channel pairs with the token's cos/sin row. Rounded to X's dtype where aten's rms_norm rounds."""
    row = tl.program_id(0)
    tok = row % tokens
    p = tl.arange(0, PAIRS)
    live = p < C // 2
    x1 = tl.load(X + row * sx_row + 2 * p, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(X + row * sx_row + 2 * p + 1, mask=live, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x1 * x1 + x2 * x2, axis=0) / C + eps)
    dtype = Out.dtype.element_ty
    w1 = tl.load(W + 2 * p, mask=live, other=0.0).to(tl.float32)
    w2 = tl.load(W + 2 * p + 1, mask=live, other=0.0).to(tl.float32)
    y1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    y2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    d = (2 * p) % D  # channel within the head; diffusers' table repeats each angle for both of a pair
    cos = tl.load(Cos + tok * sc_tok + d, mask=live, other=0.0).to(tl.float32)
    sin = tl.load(Sin + tok * ss_tok + d + 1, mask=live, other=0.0).to(tl.float32)
    base = Out + row * C + 2 * p
    tl.store(base, (y1 * cos - y2 * sin).to(dtype), mask=live)
    tl.store(base + 1, (y1 * sin + y2 * cos).to(dtype), mask=live)


@triton_op("genq::wan_qk_norm_rope", mutates_args=())
def _qk_norm_rope(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, width = qkv.shape
    c = width // 3
    rows = qkv.reshape(batch * tokens, width)
    pairs = triton.next_power_of_2(c // 2)
    outs = []
    for part, weight in enumerate((wq, wk)):
        out = torch.empty((batch, tokens, c), device=qkv.device, dtype=qkv.dtype)
        if rows.shape[0]:
            # about 8 pairs a thread: 4 warps for WAN 1.3B's 1536 channels, 8 for 14B's 5120
            wrap_triton(_norm_rope_kernel)[(rows.shape[0],)](
                rows[:, part * c:], weight, cos, sin, out, eps, tokens, rows.stride(0), cos.stride(1),
                sin.stride(1), C=c, D=head_dim, PAIRS=pairs, num_warps=max(1, min(16, pairs // 256)))
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
    from diffusers.models.activations import GELU

    swapped = 0
    for block in [*transformer.blocks, *getattr(transformer, "vace_blocks", ())]:
        first = block.ffn.net[0]
        if type(first) is GELU and first.approximate == "tanh":
            block.ffn.net[0] = GeluLinear(first.proj)
            swapped += 1
    return swapped
