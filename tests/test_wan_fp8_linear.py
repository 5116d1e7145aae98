"""WAN's fused self-attention q|k|v (GENQ_ACCEL) and its opt-in FP8 video-token products (GENQ_WAN_LINEAR=fp8,
pipelines/wan_fp8_linear.py), and the one-pass row quantisation they use on the GPU (pipelines/fp8_rows.py,
through Triton's interpreter in a child process). Speed and the difference on full-size WAN: bench/wan_step.py,
bench/wan.py --fp8-linear, bench/fp8_gemm.py (docs/PERFORMANCE.md)."""
from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from pydantic import ValidationError
from torch import nn

from pipelines import accel, wan_fp8_linear
from pipelines.accel import AccelOptions, fuse_wan_qkv
from pipelines.fp8_linear import Fp8Linear
from pipelines.tiny_wan import _TRANSFORMER
from tests.interpreted import run_interpreted

# per block: q|k|v, attn1 out, attn2 q and out, feed-forward in and out
FP8_PATHS = ("attn1.to_qkv", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
PER_BLOCK = len(FP8_PATHS)


def _inputs(tr, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tr.config.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(1, 6, tr.config.text_dim, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)


def _model(cls=WanTransformer3DModel, **extra):
    torch.manual_seed(0)
    return cls(**_TRANSFORMER, **extra).eval()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_fusing_q_k_v_gives_the_same_result_and_holds_each_weight_once():
    tr = _model()
    before = tr(**_inputs(tr))[0]
    params = sum(p.numel() for p in tr.parameters())
    assert fuse_wan_qkv(tr) == len(tr.blocks) == 2
    for block in tr.blocks:
        assert block.attn1.fused_projections and not hasattr(block.attn1, "to_q")
        assert isinstance(block.attn2.to_k, nn.Linear)  # cross-attention keeps its own projections
    assert sum(p.numel() for p in tr.parameters()) == params
    assert torch.allclose(tr(**_inputs(tr))[0], before, atol=1e-5, rtol=1e-5)
    assert fuse_wan_qkv(tr) == 0  # already fused: nothing to do


@torch.no_grad()
def test_video_token_products_become_fp8_and_stay_close():
    tr = _model()
    exact = tr(**_inputs(tr))[0]
    fuse_wan_qkv(tr)
    assert wan_fp8_linear.quantise_video_linears(tr) == PER_BLOCK * len(tr.blocks)
    for block in tr.blocks:
        for path in FP8_PATHS:
            layer = block.get_submodule(path)
            assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn, path
            assert layer.chunk is None and layer.fast_accum is wan_fp8_linear.FAST_ACCUM
        # the text's keys and values (512 rows at most) stay as loaded
        assert type(block.attn2.to_k) is nn.Linear and type(block.attn2.to_v) is nn.Linear
    got = tr(**_inputs(tr))[0]
    # e4m3 weights (3 mantissa bits): a few percent, not nothing, not noise
    assert 1e-4 < rel(got, exact) < 0.08
    assert wan_fp8_linear.quantise_video_linears(tr) == 0  # already replaced


@torch.no_grad()
def test_vace_hint_blocks_project_in_and_out_in_fp8_too():
    tr = _model(WanVACETransformer3DModel, vace_layers=[0, 1], vace_in_channels=96)
    fuse_wan_qkv(tr)
    assert fuse_wan_qkv(tr) == 0
    replaced = wan_fp8_linear.quantise_video_linears(tr)
    hint_projections = sum((b.proj_in is not None) + (b.proj_out is not None) for b in tr.vace_blocks)
    assert hint_projections >= 2
    assert replaced == PER_BLOCK * (len(tr.blocks) + len(tr.vace_blocks)) + hint_projections
    assert all(isinstance(b.proj_out, Fp8Linear) for b in tr.vace_blocks)


def test_the_setting_is_parsed_and_a_bad_value_names_it():
    assert AccelOptions.from_env({}).wan_linear == "bf16"
    assert AccelOptions.from_env({"GENQ_WAN_LINEAR": "fp8"}).wan_linear == "fp8"
    with pytest.raises(ValidationError, match="GENQ_WAN_LINEAR"):
        AccelOptions.from_env({"GENQ_WAN_LINEAR": "int4"})


def test_a_card_without_e4m3_products_is_refused_and_a_cpu_pipeline_is_left_exact():
    with pytest.raises(RuntimeError, match="GENQ_WAN_LINEAR=fp8"):
        wan_fp8_linear.check_device(torch.device("cpu"))

    class Pipe:  # accelerate_wan reads only these
        transformer = _model()
        vae = nn.Linear(1, 1)

    applied = accel.accelerate_wan(Pipe, AccelOptions(enabled=True, wan_linear="fp8"))
    assert applied == ["fused_qkv"]  # the GPU levers, FP8 among them, do not apply on a CPU
    assert not any(isinstance(m, Fp8Linear) for m in Pipe.transformer.modules())


ROWS = r"""
import json, sys, torch
from pipelines import fp8_rows
from pipelines.fp8_linear import quantise_rows_reference

out = []
g = torch.Generator().manual_seed(0)
for k in (96, 1536, 200):
    x = (torch.randn(9, k, generator=g) * 3).to(torch.bfloat16)
    x[4] = 0
    q, scale = fp8_rows.quantise_rows(x)
    torch_scale = quantise_rows_reference(x)[1]
    back = q.float() * scale
    out.append({"k": k, "dtype": str(q.dtype), "shape": list(q.shape), "scale_shape": list(scale.shape),
                "scales_equal": torch.equal(scale, torch_scale), "zero_row": float(back[4].abs().max()),
                "top": float(q.float().abs().amax(1)[[0, 1, 2, 3, 5]].min()),
                "rel": float((back - x.float()).norm() / x.float().norm())})
wide = torch.zeros(4, 2 * 96, dtype=torch.bfloat16)[:, ::2]
try:
    fp8_rows.quantise_rows(wide)
    out.append("accepted")
except ValueError as exc:
    out.append(str(exc))
print(json.dumps(out))
"""


def test_the_row_kernel_scales_each_row_as_torch_does():
    *rows, refused = run_interpreted(ROWS)
    for res in rows:
        assert res["dtype"] == "torch.float8_e4m3fn" and res["shape"] == [9, res["k"]]
        assert res["scale_shape"] == [9, 1] and res["scales_equal"]  # the GPU gives torch's values exactly
        assert res["zero_row"] == 0 and res["top"] >= 416  # each row's largest value lands at e4m3's top
        # the interpreter's own e4m3 rounding is coarser than the GPU's (tests/test_fp8_attention.py)
        assert res["rel"] < 0.1
    assert "not supported" in refused and "(4, 96)" in refused  # a strided view is refused, not misread


@pytest.mark.parametrize("check, setting", [(wan_fp8_linear.check_device, "GENQ_WAN_LINEAR=fp8"),
                                            ("attention", "GENQ_WAN_ATTENTION=fp8")])
def test_a_cuda_card_older_than_ada_is_refused_naming_the_setting(monkeypatch, check, setting):
    if check == "attention":
        from pipelines.wan_fp8_attention import check_device as check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    with pytest.raises(RuntimeError, match=f"{setting} needs a CUDA card of compute capability 8.9"):
        check(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    check(torch.device("cuda", 0))
