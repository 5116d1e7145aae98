"""WAN's plain self-attention through a function of our own, the rest of diffusers' WanAttnProcessor as is.

The self-attention of every block (attn1, and of VACE's hint blocks: 32,760 tokens against themselves at
480x832x81) holds nearly all of a step's attention FLOPs. Two levers replace that call:
- `GENQ_WAN_ATTENTION=flash4` (exact): FlashAttention-4's Hopper kernel, pipelines/flash4.py, which takes the
  cross-attention to the text too (also under `fp8`, where it can run);
- `GENQ_WAN_ATTENTION=fp8` (an approximation): pipelines/wan_fp8_attention.py.
Masked attention and the image-to-video branch keep diffusers' processor on the exact backend.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from . import flash4

EXACT_BACKEND = "_native_cudnn"  # for everything the processors here do not take


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WAN's rotary embedding on interleaved channel pairs (as diffusers' WanAttnProcessor applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class SelfAttnProcessor(WanAttnProcessor):
    """diffusers' WanAttnProcessor, with plain attention computed by `attention` (q, k, v as [batch, tokens,
    heads, dim]; None from it: diffusers' dispatch on the processor's backend), and with `fuse_qk` the
    self-attention's query and key norms and rotary embedding in one kernel (pipelines/wan_fusions.py).
    Cross-attention reaches `attention` only where `cross` is set."""

    fuse_qk = False
    cross = False

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None or attn.add_k_proj is not None or (
                encoder_hidden_states is not None and not self.cross):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = self._qkv(attn, hidden_states, encoder_hidden_states, rotary_emb)
        out = self.attention(query, key, value)
        if out is None:
            out = dispatch_attention_fn(query, key, value, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _qkv(self, attn, hidden_states, encoder_hidden_states, rotary_emb) -> tuple[torch.Tensor, ...]:
        if self.fuse_qk and encoder_hidden_states is None:
            from . import wan_fusions

            if wan_fusions.takes(attn, hidden_states, rotary_emb):
                return wan_fusions.qk_norm_rope(attn, hidden_states, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        return query, key, value


class Flash4WanAttnProcessor(SelfAttnProcessor):
    """Self- and text cross-attention through FlashAttention-4 (GENQ_WAN_ATTENTION=flash4): exact, as cuDNN's
    within bf16 rounding. It reads the projections' strided views where cuDNN's backend has them copied per
    head. Shapes its kernel does not take stay on the processor's backend."""

    cross = True

    def attention(self, query, key, value):
        return flash4.attention(query, key, value) if flash4.takes(query, key, value) else None


def use_self_attention(transformer, processor: type[SelfAttnProcessor], exact_backend: str = EXACT_BACKEND,
                       fuse_qk: bool = False) -> int:
    """Give every block's self-attention (VACE's hint blocks too), and its cross-attention if the processor
    takes it, a `processor` (with `fuse_qk`), the rest `exact_backend` ("": the library's default);
    returns how many blocks."""
    if exact_backend:
        transformer.set_attention_backend(exact_backend)
    blocks = [*transformer.blocks, *getattr(transformer, "vace_blocks", ())]
    for block in blocks:
        for attn in (block.attn1, block.attn2) if processor.cross else (block.attn1,):
            instance = processor()
            instance._attention_backend = attn.processor._attention_backend
            instance.fuse_qk = fuse_qk
            attn.set_processor(instance)
    return len(blocks)
