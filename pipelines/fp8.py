"""FP8 (e4m3) matmuls for the SDXL UNet's token-wise linear layers (GENQ_SDXL_FP8=1, pipelines/accel.py).

About two thirds of the UNet's FLOPs are nn.Linear layers inside its transformer blocks; Hopper and Ada
run float8 matmuls at twice the bf16 rate. `Fp8Linear` keeps the weight once, as float8_e4m3fn with one
fp32 scale per output channel (max |w| / 448), and quantises each activation row on the fly (one scale
per token, max |x| / 448), then calls torch._scaled_mm with row-wise scales (bf16 out, as torch requires
for row-wise scaling), adds the bias and casts back to the input's dtype. The forward is plain tensor
ops without .item() or branches on values, so inductor fuses the amax / scale / cast into the kernels
around it (the layer norm, attention's transpose, GEGLU) and only the matmul is a library call.

An approximation: e4m3 keeps 3 mantissa bits, so each weight and activation moves by up to 1/16 of its
value (about 2-4% relative error per output element on random data); bench/sdxl.py --fp8 measures the
difference on the whole image. Weights take half the fp16 bytes (plus 4 bytes per output channel).

`_scaled_mm` wants K and N multiples of 16, the first operand row-major and the second column-major
(`weight.t()` of a contiguous [N, K] tensor): layers that do not fit stay plain nn.Linear.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Smallest row amax used for a scale: an all-zero row then quantises to zeros instead of 0/0.
_TINY_AMAX = 1e-12


def fits(linear: nn.Module) -> bool:
    """A plain nn.Linear (not a subclass with its own forward, e.g. LoRA) whose K and N suit _scaled_mm."""
    return (type(linear) is nn.Linear and linear.in_features % 16 == 0 and linear.out_features % 16 == 0
            and linear.weight.is_floating_point() and linear.weight.dtype != FP8)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 w [N, K] contiguous, fp32 scale [N]) with weight ~= w * scale[:, None]; a zero row gets scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
    return q, scale.contiguous()


class Fp8Linear(nn.Module):
    """y = x @ W.T + b with W in float8 (per-output-channel scales) and x quantised per row on the fly."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = False):
        super().__init__()
        if not fits(linear):
            raise ValueError(f"not an nn.Linear with K, N multiples of 16: {linear}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fast_accum = fast_accum  # Hopper's faster, less exact fp8 accumulation (off: exact fp32 sums)
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable inside and outside inference_mode
            q, scale = quantize_weight(linear.weight)
        # Buffers, not parameters: Module.to / .cuda() / .cpu() move them, nothing trains them, and
        # diffusers' `unet.dtype` (first floating parameter) does not report float8.
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)  # [N] fp32
        self.bias = linear.bias  # the layer's own Parameter (its dtype), or None

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating buffer, float8 and the fp32 scales included: where
        # fn changes a dtype, these two take only its device (.to("cuda"), .cpu(), to_empty keep theirs).
        q, scale = self._buffers.pop("weight_fp8"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_fp8"], self._buffers["weight_scale"] = q, scale
        for key, t in (("weight_fp8", q), ("weight_scale", scale)):
            new = fn(t)
            self._buffers[key] = new if new.dtype == t.dtype else t.to(new.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        # per-token scale: amax over the row, clamped away from zero, mapped onto e4m3's largest value
        scale_a = rows.abs().amax(dim=1, keepdim=True).clamp(min=_TINY_AMAX) / FP8_MAX  # [M, 1] fp32
        x_fp8 = (rows / scale_a).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=scale_a, scale_b=self.weight_scale.unsqueeze(0),
                             bias=None, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        if self.bias is not None:
            y = y.float() + self.bias  # bias in fp32, then one rounding to the input's dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, float8_e4m3fn{', fast_accum' if self.fast_accum else ''}")


class Fp8Report(NamedTuple):
    layers: int  # nn.Linear layers replaced by Fp8Linear
    bytes_saved: int  # resident weight bytes freed (original weights minus float8 weights and scales)
    kept: tuple[str, ...]  # chosen layers left plain (shape not a multiple of 16, not a plain nn.Linear)


# Inside each transformer block: the layers that see every latent token. Self-attention may be fused
# (diffusers' fuse_qkv_projections adds to_qkv and keeps to_q/k/v, unused then: converting them halves
# their resident bytes too). Cross-attention's to_k / to_v / to_kv see only the 77 text tokens: no gain.
_SELF_ATTENTION = ("to_qkv", "to_q", "to_k", "to_v", "to_out.0")
_CROSS_ATTENTION = ("to_q", "to_out.0")
_FEED_FORWARD = ("net.0.proj", "net.2")  # GEGLU's projection, then the output projection


def token_linears(unet: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of the layers to convert: proj_in / proj_out of every Transformer2DModel,
    attention and feed-forward projections of its blocks (not the time / text embeddings)."""
    chosen: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        blocks = getattr(module, "transformer_blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            continue
        candidates = {"proj_in": getattr(module, "proj_in", None), "proj_out": getattr(module, "proj_out", None)}
        for i, block in enumerate(blocks):
            for attn_name in ("attn1", "attn2"):
                attn = getattr(block, attn_name, None)
                if attn is None:
                    continue
                roles = _CROSS_ATTENTION if getattr(attn, "is_cross_attention", False) else _SELF_ATTENTION
                for role in roles:
                    candidates[f"transformer_blocks.{i}.{attn_name}.{role}"] = _get(attn, role)
            ff = getattr(block, "ff", None)
            for role in _FEED_FORWARD:
                candidates[f"transformer_blocks.{i}.ff.{role}"] = _get(ff, role) if ff is not None else None
        prefix = f"{name}." if name else ""
        chosen.update({prefix + k: v for k, v in candidates.items() if isinstance(v, nn.Linear)})
    return chosen


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None) if not part.isdigit() else _index(module, int(part))
        if module is None:
            return None
    return module


def _index(module: nn.Module, i: int) -> nn.Module | None:
    return module[i] if isinstance(module, (nn.ModuleList, nn.Sequential)) and i < len(module) else None


def convert_unet_linears(unet: nn.Module, fast_accum: bool = False) -> Fp8Report:
    """Replace, in place, the UNet's token-wise linear layers (token_linears) by Fp8Linear.

    Works on any device (CPU too, for tests); run it after fuse_qkv_projections and before compiling.
    The float weights go with the replaced modules: one copy of each weight, in float8."""
    layers = saved = 0
    kept = []
    for name, linear in token_linears(unet).items():
        if not fits(linear):
            kept.append(name)
            continue
        fp8 = Fp8Linear(linear, fast_accum=fast_accum)
        saved += linear.weight.numel() * linear.weight.element_size() - fp8.weight_fp8.numel() \
            - fp8.weight_scale.numel() * fp8.weight_scale.element_size()
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, fp8)
        layers += 1
    return Fp8Report(layers, saved, tuple(kept))
