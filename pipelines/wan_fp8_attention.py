"""WAN's self-attention through pipelines/fp8_attention.py (GENQ_WAN_ATTENTION=fp8, opt-in).

Only the self-attention (attn1 of each block, and of VACE's hint blocks: 32,760 tokens against themselves
at 480x832x81, nearly all of a step's attention FLOPs) changes. Cross-attention to the 512 text tokens,
masked attention and the image-to-video branch keep diffusers' processor on the cuDNN backend.
"""
from __future__ import annotations

import torch

from . import fp8_attention
from .fp8_linear import require_fp8_card
from .wan_self_attention import EXACT_BACKEND, SelfAttnProcessor, use_self_attention


class Fp8WanAttnProcessor(SelfAttnProcessor):
    """diffusers' WanAttnProcessor, with plain self-attention computed by fp8_attention.attention (shapes
    the kernel does not take, such as a head dim that is not a power of two, stay exact)."""

    def attention(self, query, key, value):
        if fp8_attention.supported(query, key, value) is not None:
            return None
        return fp8_attention.attention(query, key, value)


def check_device(device: torch.device) -> None:
    """int8 and e4m3 tensor-core products need compute capability 8.9 or later (Ada, Hopper)."""
    require_fp8_card(device, "GENQ_WAN_ATTENTION=fp8")


def use_fp8_attention(transformer, exact_backend: str = EXACT_BACKEND, fuse_qk: bool = False) -> int:
    """Give every block's self-attention the FP8 processor (VACE's hint blocks too; `fuse_qk`: see
    SelfAttnProcessor), the rest `exact_backend`; returns how many."""
    return use_self_attention(transformer, Fp8WanAttnProcessor, exact_backend, fuse_qk)
