"""FP8 weights for linear layers: the chat models' (GENQ_CHAT_WEIGHTS=fp8, docs/CHAT.md) and WAN's video-token
products (GENQ_WAN_LINEAR=fp8, pipelines/wan_fp8_linear.py); bench/sdxl.py --fp8-linear measures the SDXL
UNet's (not shipped: 1.03x, docs/PERFORMANCE.md).

A decode step reads every weight once per token for a few rows of activations: it is bound by memory
bandwidth, not arithmetic. Stored as float8 e4m3 with one fp32 scale per output feature, a weight is
half the bytes of bf16 (7.1 GB less for Qwen 2.5 7B) and a step reads half as much. Each weight keeps 3
mantissa bits, its row scaled so that the row's largest value becomes e4m3's largest, 448 (the weight
layout vLLM and text-generation-inference serve as `fp8`).

Which product runs:
- at most 16 rows on CUDA (a decode step): pipelines/skinny_linear.py's kernel, which widens each weight
  tile in registers and applies the scale to the fp32 sums; activations stay in the model's dtype;
- more rows on CUDA (a prompt's prefill, WAN's video tokens): e4m3 x e4m3 on tensor cores
  (`torch._scaled_mm`), each token's activations scaled to e4m3 as well (a scale per row, in one pass by
  pipelines/fp8_rows.py's kernel), as vLLM's dynamic fp8 does. Widening the weight
  to bf16 for every product instead doubled a 300-token prompt's time to first token on an H200
  (41 ms against 22 ms in bf16), since it writes and reads a bf16 copy of every weight;
- on a CPU: the weight widened to the activations' dtype, one product at a time, the scale applied to
  the result in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
PROMPT_CHUNK = 4096  # rows per tensor-core product of a prompt (scaled_mm)


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale per output feature) with weight ~= fp8.float() * scale[:, None]."""
    w = weight.detach().float()
    # A row of zeros keeps scale 1: dividing by 0 would fill it with NaN.
    scale = w.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantise(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.to(torch.float32) * scale[:, None]).to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, chunk: int | None = PROMPT_CHUNK, fast_accum: bool = False) -> torch.Tensor:
    """F.linear for a weight as loaded (`scale` None) or an FP8 weight with its per-feature scale (`chunk`,
    `fast_accum`: see scaled_mm)."""
    if scale is None:
        return F.linear(x, weight, bias)
    if x.is_cuda:
        from . import skinny_linear

        if skinny_linear.supported(x, weight, scale):
            return skinny_linear.linear(x, weight, bias, scale=scale)
        return scaled_mm(x, weight, scale, bias, chunk, fast_accum)
    # e4m3 values are exact in x's dtype, and a per-feature scale commutes with the sum: the scale goes on
    # the product in fp32, as in the kernel, instead of on a scaled copy of the weight.
    out = F.linear(x, weight.to(x.dtype)).float() * scale
    if bias is not None:
        out += bias
    return out.to(x.dtype)


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              chunk: int | None = PROMPT_CHUNK, fast_accum: bool = False):
    """x times an e4m3 weight on tensor cores (CUDA, compute capability 8.9+): x quantised to e4m3 per row,
    `chunk` rows at a time, so a long prompt's quantised copy stays small beside the activations the memory
    table measured in bf16 (and, where fp8_rows' kernel does not apply, its fp32 quotients: 2.5 GB for a
    32k-token warm-up). None: one product for all rows (WAN's compiled blocks, whose shapes are fixed).
    `fast_accum`: Hopper's FP8 accumulation without periodic promotion to fp32 (faster, less exact)."""
    rows = x.reshape(-1, x.shape[-1])
    step = chunk or max(rows.shape[0], 1)
    parts = [_scaled_mm_rows(rows[i:i + step], weight, scale, bias, fast_accum)
             for i in range(0, rows.shape[0], step)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def quantise_rows_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scale per row [M, 1]) in torch: the arithmetic fp8_rows' kernel reproduces."""
    # max |value| per row without an abs() copy of the rows; a row of zeros keeps a tiny scale (0, not NaN)
    peak = torch.maximum(rows.amax(dim=1, keepdim=True), -rows.amin(dim=1, keepdim=True)).float()
    row_scale = (peak / FP8_MAX).clamp(min=1e-12)
    return (rows / row_scale).to(FP8), row_scale


def _scaled_mm_rows(rows, weight, scale, bias, fast_accum=False):
    from . import fp8_rows

    # one pass over the rows (a kernel) where it applies, else torch's two
    quantise = fp8_rows.quantise_rows if fp8_rows.supported(rows) else quantise_rows_reference
    quantised, row_scale = quantise(rows)
    # torch's rowwise-scaled product writes bf16 only: an fp16 model (SDXL's UNet) gets its dtype back after it
    out_dtype = torch.bfloat16 if rows.dtype == torch.float16 else rows.dtype
    out = torch._scaled_mm(quantised, weight.t(), scale_a=row_scale, scale_b=scale[None, :],
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                           use_fast_accum=fast_accum)
    return out.to(rows.dtype)


class Fp8Linear(nn.Module):
    """nn.Linear with an e4m3 weight and an fp32 scale per output feature (parameters, so `.to(device)`,
    `parameters()` and state_dict carry them; never trained). `chunk`, `fast_accum`: how the tensor-core
    product runs (scaled_mm)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 chunk: int | None = PROMPT_CHUNK, fast_accum: bool = False):
        super().__init__()
        self.chunk, self.fast_accum = chunk, fast_accum
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Linear, chunk: int | None = PROMPT_CHUNK, fast_accum: bool = False) -> "Fp8Linear":
        return cls(*quantise(module.weight), module.bias, chunk, fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_scale, self.chunk, self.fast_accum)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


def check_device(device: torch.device) -> None:
    """FP8 weights need Triton's e4m3 conversion on CUDA, i.e. compute capability 8.9 or newer (Ada, Hopper)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"GENQ_CHAT_WEIGHTS=fp8 needs a GPU of compute capability 8.9 or newer; {name} is "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}")


def require_fp8_card(device: torch.device, setting: str) -> None:
    """For a lever that has no CPU path (WAN's): a CUDA card of compute capability 8.9 or later, else
    a RuntimeError naming `setting`."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"{setting} needs a CUDA card of compute capability 8.9 or later; the model is on {device}")


@torch.no_grad()
def replace_linears(model: nn.Module, names: list[str], chunk: int | None = PROMPT_CHUNK,
                    fast_accum: bool = False) -> int:
    """The nn.Linear layers at these dotted paths replaced in place by Fp8Linear copies, one at a time, so
    each weight is freed as its copy is made. Every path is resolved before the first replacement, so a
    path that names nothing leaves the model as it was (LookupError, the paths shown with repr)."""
    slots, missing = [], []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        # the key object the parent holds, not the string split off the path
        key = next((k for k in getattr(parent, "_modules", {}) if k == child), None)
        if key is None or type(parent._modules[key]) is not nn.Linear:
            missing.append(name)
        else:
            slots.append((parent, key))
    if missing:
        raise LookupError(f"no nn.Linear at {len(missing)} of {len(names)} paths, model unchanged: "
                          f"{', '.join(map(repr, missing[:5]))}")
    for parent, key in slots:
        setattr(parent, key, Fp8Linear.from_linear(parent._modules[key], chunk, fast_accum))
    return len(slots)


def linear_names(model: nn.Module, suffixes: tuple[str, ...], within: tuple[str, ...]) -> list[str]:
    """Paths of the plain nn.Linear layers under the `within` prefixes whose paths end in one of `suffixes`
    (whole path components: "to_q" does not match "attn1.add_to_q")."""
    ends = tuple(f".{suffix}" for suffix in suffixes)
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.Linear and name.startswith(within) and f".{name}".endswith(ends)]


def quantise_model(model: nn.Module) -> int:
    """Every nn.Linear of the decoder layers, and an untied LM head, replaced by an Fp8Linear in place,
    one at a time (the bf16 weight is freed as its copy is made). Returns how many were replaced."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    names = [name for name, mod in model.named_modules() if type(mod) is nn.Linear
             and (".layers." in f".{name}" or name == "lm_head")
             # a head tied to the embedding table stays: quantising would hold the table twice
             and not (embed is not None and mod.weight is getattr(embed, "weight", None))]
    return replace_linears(model, names)
