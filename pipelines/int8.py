"""Weight-only int8 for FastDecoder's one-row decode step (GENQ_CHAT_WEIGHTS=int8, docs/CHAT.md "Batching").

One row is a chain of matrix-vector products: every weight byte is read once per token for two flops, so
a step takes about the weight bytes over the memory bandwidth. Stored as int8 with one scale per output
row, the projections' bytes halve. `int8_linear` is written the way inductor can fuse: with
coordinate-descent tuning (which FastDecoder.decode turns on for one-row shapes) a one-row matmul becomes
a multiply-reduce kernel, and the int8-to-bf16 conversion and the scale fold into it, so the bf16 weight
is never materialised (gpt-fast's int8 lever). With more rows the same code would convert every weight
to bf16 on each call, slower than reading bf16: FastDecoder uses these copies for one-row shapes only;
prefill and the other shapes keep the model's own bf16 weights, which stay resident.

An approximation: each weight moves by at most half its row's step (max |w| / 254). The copies are extra
memory, half the bf16 bytes of what they cover (6.1 GiB for Qwen 2.5 7B's decoder layers), built on first
use and again after the weights moved (to CPU and back), like pipelines/fused.py's fused weights. The
lm_head stays bf16 by default: on an H200 its int8 copy (0.5 GB more) made one stream no faster (184 tok/s
with it, 186-189 without; bf16 173) and the logits no closer.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .fused import _GATED_MLPS, FusedLayer, _address, _fusable

# Rows quantised at a time: the fp32 transient stays ~0.3 GB even for a 152064-row lm_head.
_CHUNK_ROWS = 4096


class Int8Linear(NamedTuple):
    """y = (x @ weight.T) * scale + bias: int8 [out, in], scale [out] and bias [out] in the model's dtype."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None


class Int8Layer(NamedTuple):
    """One decoder layer's int8 copies; None: that block runs the bf16 path (fused or the modules)."""

    qkv: Int8Linear | None = None
    qkv_sizes: tuple[int, ...] = ()
    o: Int8Linear | None = None
    gate_up: Int8Linear | None = None  # with `down`: the whole gated MLP, or none of it
    gate_up_sizes: tuple[int, ...] = ()
    down: Int8Linear | None = None


class Int8Weights(NamedTuple):
    layers: list[Int8Layer]
    lm_head: Int8Linear | None = None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q [out, in], scale [out]) with weight ~= q * scale[:, None]: symmetric, per output row.

    The scale is stored in the weight's dtype and q is rounded against that stored value, so the only
    error is q's rounding, |w - q * scale| <= scale / 2. A row of zeros gets scale 1 and q 0."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable inside and outside inference_mode
        rows = weight.shape[0]
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(rows, dtype=weight.dtype, device=weight.device)
        for start in range(0, rows, _CHUNK_ROWS):
            # fp32: w / s spans +-127 and needs its fraction, more than bf16's 8 significant bits
            w = weight[start:start + _CHUNK_ROWS].float()
            s = (w.abs().amax(dim=1) / 127).to(weight.dtype)
            s = torch.where(s > 0, s, torch.ones_like(s))
            scale[start:start + _CHUNK_ROWS] = s
            q[start:start + _CHUNK_ROWS] = (w / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale[:, None]


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """x @ (q * scale).T + bias, in x's dtype. The scale multiplies the output, not the weight: with one
    row, inductor fuses the conversion and both epilogues into a single reduction over q."""
    y = F.linear(x, q.to(x.dtype)) * scale
    return y if bias is None else y + bias


def linear(module: nn.Module, x: torch.Tensor, w8: Int8Linear | None) -> torch.Tensor:
    """module(x), through its int8 copy when there is one."""
    return module(x) if w8 is None else int8_linear(x, *w8)


def project_qkv(attn, h: torch.Tensor, f: FusedLayer, w8: Int8Layer | None):
    """q, k, v of h: the int8 copy when there is one, else fused.project_qkv (bf16)."""
    if w8 is None or w8.qkv is None:
        return fused.project_qkv(attn, h, f)
    return int8_linear(h, *w8.qkv).split(w8.qkv_sizes, dim=-1)


def mlp(module, h: torch.Tensor, f: FusedLayer, w8: Int8Layer | None) -> torch.Tensor:
    if w8 is None or w8.gate_up is None:
        return fused.mlp(module, h, f)
    gate, up = int8_linear(h, *w8.gate_up).split(w8.gate_up_sizes, dim=-1)
    return int8_linear(module.act_fn(gate) * up, *w8.down)


# --- building -------------------------------------------------------------------------------------


def _blocks(layer) -> dict[str, list[nn.Module]]:
    """The layer's projections an int8 copy replaces, by block. Only plain nn.Linear (fused._fusable):
    a LoRA-wrapped, hooked or already quantised projection computes something else and keeps its path."""
    attn, ffn, out = layer.self_attn, layer.mlp, {}
    if _fusable([attn.q_proj, attn.k_proj, attn.v_proj]):
        out["qkv"] = [attn.q_proj, attn.k_proj, attn.v_proj]
    if _fusable([attn.o_proj]):
        out["o"] = [attn.o_proj]
    if type(ffn).__name__ in _GATED_MLPS and _fusable([ffn.gate_proj, ffn.up_proj]) and _fusable([ffn.down_proj]):
        out["gate_up"], out["down"] = [ffn.gate_proj, ffn.up_proj], [ffn.down_proj]
    return out


def _stacked(mods: Sequence[nn.Module], weight: torch.Tensor | None, bias: torch.Tensor | None) -> Int8Linear:
    # The fused tensor when pipelines/fused.py built one (no transient copy); else the modules' weights
    # stacked (fuse=False). Rows are quantised independently, so both give the same bytes.
    if weight is None:
        weight = torch.cat([m.weight.detach() for m in mods])
        bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
    q, scale = quantize(weight.detach())
    return Int8Linear(q, scale, None if bias is None else bias.detach())


def _signature(model, layer) -> tuple:
    # Which modules hold which memory (a .to() or a fused rebuild changes it); the lm_head rides along.
    attn, ffn = layer.self_attn, layer.mlp
    mods = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, getattr(ffn, "gate_proj", None),
            getattr(ffn, "up_proj", None), getattr(ffn, "down_proj", None), model.lm_head]
    return tuple((id(m), _address(getattr(m, "weight", None)), _address(getattr(m, "bias", None))) for m in mods)


class Int8Projections:
    """The int8 copies of a model's decoder projections (and, with lm_head=True, its lm_head), built on
    first use and again after the weights moved; `release()` drops them (weights leaving the GPU)."""

    def __init__(self, model, layers, *, lm_head: bool = False, static: bool = False):
        self.model, self.model_layers, self.quantize_lm_head, self.static = model, layers, lm_head, static
        self._weights: Int8Weights | None = None
        self._signatures: list[tuple] = []
        self.builds = 0  # how many times the copies were made (tests, logs)

    @property
    def built(self) -> bool:
        return self._weights is not None

    def _lm_head_ok(self) -> bool:
        return self.quantize_lm_head and _fusable([self.model.lm_head])

    def nbytes(self) -> int:
        """Bytes the copies take (built or not): int8 weights plus one scale per row."""
        mods = [m for layer in self.model_layers for block in _blocks(layer).values() for m in block]
        if self._lm_head_ok():
            mods.append(self.model.lm_head)
        return sum(m.weight.shape[0] * (m.weight.shape[1] + m.weight.element_size()) for m in mods)

    def replaced_bytes(self) -> int:
        """Bytes of the bf16 weights the copies stand in for in a one-row step."""
        mods = [m for layer in self.model_layers for block in _blocks(layer).values() for m in block]
        if self._lm_head_ok():
            mods.append(self.model.lm_head)
        return sum(m.weight.numel() * m.weight.element_size() for m in mods)

    def weights(self, fused_layers: list[FusedLayer], check_all: bool = True) -> Int8Weights:
        """Current copies, made from `fused_layers` (FusedProjections.layers(), called first: a fused
        rebuild re-points the parameters, which marks these stale). `check_all=False` looks at the first
        layer and the lm_head only, as FusedProjections.layers does per decode step."""
        stale = self._weights is None or (
            any(_signature(self.model, l) != s for l, s in zip(self.model_layers, self._signatures)) if check_all
            else _signature(self.model, self.model_layers[0]) != self._signatures[0])
        if stale:
            self.release()  # the old copies (on the old device) go before new ones are made
            head = _stacked([self.model.lm_head], None, None) if self._lm_head_ok() else None
            self._weights = Int8Weights([self._build(l, f) for l, f in zip(self.model_layers, fused_layers)], head)
            self._signatures = [_signature(self.model, layer) for layer in self.model_layers]
            self.builds += 1
            if self.static:
                # Static inputs of the CUDA graphs, read in place; unguarded like the fused weights: after
                # a rebuild the graphs see new addresses and re-record rather than compile again.
                for t in _tensors(self._weights):
                    torch._dynamo.mark_static_address(t, guard=False)
        return self._weights

    def release(self) -> None:
        self._weights, self._signatures = None, []

    def _build(self, layer, f: FusedLayer) -> Int8Layer:
        blocks, parts = _blocks(layer), {}
        if "qkv" in blocks:
            parts["qkv"] = _stacked(blocks["qkv"], f.qkv, f.qkv_bias)
            parts["qkv_sizes"] = tuple(m.weight.shape[0] for m in blocks["qkv"])
        if "o" in blocks:
            parts["o"] = _stacked(blocks["o"], None, None)
        if "gate_up" in blocks:
            parts["gate_up"] = _stacked(blocks["gate_up"], f.gate_up, f.gate_up_bias)
            parts["gate_up_sizes"] = tuple(m.weight.shape[0] for m in blocks["gate_up"])
            parts["down"] = _stacked(blocks["down"], None, None)
        return Int8Layer(**parts)


def _tensors(w: Int8Weights) -> list[torch.Tensor]:
    lins = [lin for layer in w.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [w.lm_head]
    return [t for lin in lins if lin is not None for t in lin if t is not None]
