"""Fused projections for FastDecoder: per layer one weight for q|k|v and one for gate|up.

A one-row decode step is a chain of matrix-vector products bound by memory bandwidth; three small
ones (two for the MLP) waste bandwidth and launch more kernels than one over the rows stacked. The
math is the same dot products, split afterwards.

No second copy of the weights: the fused tensor is built once per layer and the modules' parameters
become views into it, so the model's own forward (generate(), the prefill check in bench/qwen.py),
its state_dict and `.to()` keep working on the one copy. A `.to()` (the daemon parks idle weights on
the CPU) gives the parameters new, separate tensors; `FusedProjections.layers` notices and fuses again.
FP8 projections (pipelines/fp8_linear.py) fuse the same way, their scales stacked beside the weights.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .fp8_linear import Fp8Linear, linear

# MLP classes known to compute down_proj(act_fn(gate_proj(x)) * up_proj(x)); any other keeps its forward.
_GATED_MLPS = {"Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP"}


class FusedLayer(NamedTuple):
    """One layer's fused weights; qkv / gate_up None: that part runs the model's own modules."""

    qkv: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None
    qkv_sizes: tuple[int, ...] = ()
    qkv_scale: torch.Tensor | None = None  # FP8 weights (pipelines/fp8_linear.py): per output feature
    gate_up: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    gate_up_sizes: tuple[int, ...] = ()
    gate_up_scale: torch.Tensor | None = None


def _fusable(mods: Sequence[nn.Module]) -> bool:
    # Exactly nn.Linear (or genq's own Fp8Linear) over plain parameters: a quantised (bitsandbytes
    # subclasses nn.Linear, torchao swaps the weight's class), LoRA-wrapped, hooked or offloaded
    # (accelerate: hooks, meta weights) projection computes something other than F.linear on its .weight.
    def plain(m):
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        return (type(m) in (nn.Linear, Fp8Linear) and type(w) is nn.Parameter and w.is_floating_point()
                and w.dim() == 2 and w.device.type != "meta" and (b is None or type(b) is nn.Parameter)
                and not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m))
    if not all(plain(m) for m in mods):
        return False
    m0 = mods[0]
    return all(type(m) is type(m0) and m.weight.dtype == m0.weight.dtype and m.weight.device == m0.weight.device
               and m.weight.shape[1] == m0.weight.shape[1] and (m.bias is None) == (m0.bias is None) for m in mods)


def _fuse(mods: Sequence[nn.Module], name: str) -> dict:
    """The modules' weights (bias, FP8 scales) stacked as FusedLayer fields `name`, `name_bias`, ...;
    their parameters now views of the stack."""
    # Plain tensors even when called under inference_mode (generate(), warm()): inference tensors as
    # parameters would refuse a later in-place load_state_dict outside it.
    with torch.inference_mode(False), torch.no_grad():
        parts = {name: _stack([m.weight for m in mods]), f"{name}_sizes": tuple(m.weight.shape[0] for m in mods)}
        if mods[0].bias is not None:
            parts[f"{name}_bias"] = _stack([m.bias for m in mods])
        if isinstance(mods[0], Fp8Linear):
            parts[f"{name}_scale"] = _stack([m.weight_scale for m in mods])
    return parts


def _stack(params: list[nn.Parameter]) -> torch.Tensor:
    # Parameters already lying one after the other in one storage (fused by another decoder of the same
    # model: bench/qwen.py, tests) are only viewed: a second concatenation would strand the first
    # decoder's fused tensor as a second copy of the weights.
    first, rows = params[0], sum(p.shape[0] for p in params)
    offset, storage = first.storage_offset(), first.untyped_storage()
    for p in params:
        if not p.is_contiguous() or p.untyped_storage().data_ptr() != storage.data_ptr() \
                or p.storage_offset() != offset:
            break
        offset += p.numel()
    else:
        return first.new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]))
    out, start = torch.cat(params), 0
    for p in params:  # the separate originals are freed here, one layer at a time
        p.data = out[start:start + p.shape[0]]
        start += p.shape[0]
    return out


def _address(t) -> int | None:
    try:
        return t.data_ptr()
    except (AttributeError, RuntimeError):  # None, or a quantised tensor subclass without storage
        return None


def _signature(layer) -> tuple:
    # Which module objects hold which memory: a .to() (or a swapped-in module) changes it.
    attn, ffn = layer.self_attn, layer.mlp
    mods = [attn.q_proj, attn.k_proj, attn.v_proj, getattr(ffn, "gate_proj", None), getattr(ffn, "up_proj", None)]
    return tuple((id(m), _address(getattr(m, "weight", None)), _address(getattr(m, "bias", None))) for m in mods)


class FusedProjections:
    """The fused weights of every layer of a model, built on first use and again after weights moved."""

    def __init__(self, layers, *, enabled: bool = True, static: bool = False):
        self.model_layers, self.enabled, self.static = layers, enabled, static
        self._fused: list[FusedLayer] | None = None
        self._signatures: list[tuple] = []
        self.builds = 0  # how many times the weights were fused (tests, logs)

    @property
    def built(self) -> bool:
        return self._fused is not None

    def layers(self, check_all: bool = True) -> list[FusedLayer]:
        """Current fused weights; `check_all=False` looks at the first layer only (per decode step: a
        .to() replaces every parameter, while prefill's full check also catches a swapped module)."""
        stale = self._fused is None or (
            any(_signature(l) != s for l, s in zip(self.model_layers, self._signatures)) if check_all
            else _signature(self.model_layers[0]) != self._signatures[0])
        if stale:
            self.release()  # the old fused tensors (on the old device) go before new ones are made
            self._fused = [self._build(layer) for layer in self.model_layers]
            self._signatures = [_signature(layer) for layer in self.model_layers]
            self.builds += 1
        return self._fused

    def release(self) -> None:
        """Drop the references (weights leaving the GPU), so the memory is freed with the parameters."""
        self._fused, self._signatures = None, []

    def _build(self, layer) -> FusedLayer:
        if not self.enabled:
            return FusedLayer()
        attn, ffn, parts = layer.self_attn, layer.mlp, {}
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        if _fusable(qkv):
            parts.update(_fuse(qkv, "qkv"))
        if type(ffn).__name__ in _GATED_MLPS and _fusable([ffn.gate_proj, ffn.up_proj]):
            parts.update(_fuse([ffn.gate_proj, ffn.up_proj], "gate_up"))
        if self.static:
            # Compiled decode (CUDA graphs) reads these in place instead of copying them into every replay;
            # unguarded, like the KV pool: after a rebuild the graphs see new addresses and re-record
            # (never replay onto freed memory) instead of compiling again.
            for t in parts.values():
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_static_address(t, guard=False)
        return FusedLayer(**parts)


def project_qkv(attn, h: torch.Tensor, f: FusedLayer):
    """q, k, v of h: one matmul when fused, the model's modules otherwise."""
    if f.qkv is None:
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    return linear(h, f.qkv, f.qkv_bias, f.qkv_scale).split(f.qkv_sizes, dim=-1)


def mlp(module, h: torch.Tensor, f: FusedLayer) -> torch.Tensor:
    if f.gate_up is None:
        return module(h)
    gate, up = linear(h, f.gate_up, f.gate_up_bias, f.gate_up_scale).split(f.gate_up_sizes, dim=-1)
    return module.down_proj(module.act_fn(gate) * up)
