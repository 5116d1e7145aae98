"""WAN's self-attention through pipelines/fp8_attention.py (GENQ_WAN_ATTENTION=fp8, opt-in).

Only the self-attention (attn1 of each block, and of VACE's hint blocks: 32,760 tokens against themselves
at 480x832x81, nearly all of a step's attention FLOPs) changes. Cross-attention to the 512 text tokens,
masked attention and the image-to-video branch keep diffusers' processor on the cuDNN backend.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from . import fp8_attention
from .fp8_linear import require_fp8_card

EXACT_BACKEND = "_native_cudnn"  # for everything the FP8 path does not take


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WAN's rotary embedding on interleaved channel pairs (as diffusers' WanAttnProcessor applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class Fp8WanAttnProcessor(WanAttnProcessor):
    """diffusers' WanAttnProcessor, with plain self-attention computed by fp8_attention.attention (shapes
    the kernel does not take, such as a head dim that is not a power of two, stay exact)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        if fp8_attention.supported(query, key, value) is None:
            out = fp8_attention.attention(query, key, value)
        else:
            out = dispatch_attention_fn(query, key, value, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def check_device(device: torch.device) -> None:
    """int8 and e4m3 tensor-core products need compute capability 8.9 or later (Ada, Hopper)."""
    require_fp8_card(device, "GENQ_WAN_ATTENTION=fp8")


def use_fp8_attention(transformer, exact_backend: str = EXACT_BACKEND) -> int:
    """Give every block's self-attention the FP8 processor (VACE's hint blocks too), the rest
    `exact_backend`; returns how many."""
    transformer.set_attention_backend(exact_backend)
    blocks = [*transformer.blocks, *getattr(transformer, "vace_blocks", ())]
    for block in blocks:
        processor = Fp8WanAttnProcessor()
        processor._attention_backend = block.attn1.processor._attention_backend
        block.attn1.set_processor(processor)
    return len(blocks)
