"""WAN's self-attention through a function of our own, the rest of diffusers' WanAttnProcessor unchanged.

Two uses, both on the plain self-attention of every block (attn1, and of VACE's hint blocks: 32,760
tokens against themselves at 480x832x81, nearly all of a step's attention FLOPs):
- `GENQ_WAN_ATTENTION=cudnn_strided` (exact): cuDNN's flash kernel on q, k and v in the [batch, tokens,
  heads, dim] layout the projections leave them in, as plain diffusers' eager default hands them to SDPA.
  diffusers' `_native_cudnn` backend, and inductor's SDPA lowering inside the compiled blocks, make them
  contiguous per head first; the same cuDNN kernel then ran 4% slower on an H200 (717 against 689 ms a
  guided step, docs/PERFORMANCE.md). The call is one opaque op (`genq::attention_bshd`) whose inputs keep
  their stride order, so the compiled blocks cannot relayout them.
- `GENQ_WAN_ATTENTION=fp8` (an approximation): pipelines/wan_fp8_attention.py.
Cross-attention to the text, masked attention and the image-to-video branch keep diffusers' processor on
the exact backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections
from torch.nn.attention import SDPBackend, sdpa_kernel

EXACT_BACKEND = "_native_cudnn"  # for everything the processors here do not take


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WAN's rotary embedding on interleaved channel pairs (as diffusers' WanAttnProcessor applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class SelfAttnProcessor(WanAttnProcessor):
    """diffusers' WanAttnProcessor, with plain self-attention computed by `self_attention` (q, k, v as
    [batch, tokens, heads, dim]; None from it: diffusers' dispatch on the processor's backend)."""

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        out = self.self_attention(query, key, value)
        if out is None:
            out = dispatch_attention_fn(query, key, value, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


@torch.library.custom_op("genq::attention_bshd", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def attention_bshd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention of [batch, tokens, heads, dim] tensors, no mask, the heads viewed out of that layout (no
    copies); cuDNN's kernel on CUDA, SDPA's choice elsewhere. Out: [batch, tokens, heads, dim], contiguous."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).contiguous()


@attention_bshd.register_fake
def _(query, key, value):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


class StridedCudnnWanAttnProcessor(SelfAttnProcessor):
    """Self-attention through `attention_bshd` (GENQ_WAN_ATTENTION=cudnn_strided): exact."""

    def self_attention(self, query, key, value):
        return attention_bshd(query, key, value)


def use_self_attention(transformer, processor: type[SelfAttnProcessor], exact_backend: str = EXACT_BACKEND) -> int:
    """Give every block's self-attention (VACE's hint blocks too) a `processor`, the rest `exact_backend`;
    returns how many."""
    transformer.set_attention_backend(exact_backend)
    blocks = [*transformer.blocks, *getattr(transformer, "vace_blocks", ())]
    for block in blocks:
        instance = processor()
        instance._attention_backend = block.attn1.processor._attention_backend
        block.attn1.set_processor(instance)
    return len(blocks)
