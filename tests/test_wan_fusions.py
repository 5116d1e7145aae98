"""GENQ_WAN_FUSE (pipelines/wan_fusions.py): the query/key norm + RoPE kernel gives diffusers' queries and
keys, the WAN processor uses it only where it fits, and the feed-forward's GELU module computes what
diffusers' does. The Triton kernel runs here through Triton's interpreter, in a child process (the
interpreter must be on before Triton compiles anything), in fp32 and fp16 (the interpreter computes bf16 as
integers; bf16 and cuBLASLt's GELU epilogue are checked on the GPU: bench.wan's equality, bench.wan_profile's
vs_baseline)."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.activations import GELU

from bench.models import build_wan
from pipelines.accel import AccelOptions, _wan_attention, fuse_wan_qkv
from pipelines.wan_self_attention import SelfAttnProcessor
from tests.interpreted import run_interpreted

pytest.importorskip("triton")
from pipelines import wan_fusions  # noqa: E402  needs Triton

KERNEL = r"""
import json, sys, torch
from pipelines import wan_fusions
from pipelines.wan_self_attention import _rotate

out = []
for batch, tokens, heads, dim, dtype, rows in json.loads(sys.argv[1]):
    wan_fusions.NORM_ROPE = wan_fusions.Launch(rows=rows, warps=4)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(tokens)
    c = heads * dim
    qkv = (3 * torch.randn(batch, tokens, 3 * c, generator=g)).to(dt)
    wq, wk = (torch.randn(c, generator=g).to(dt) for _ in range(2))
    angle = torch.randn(tokens, dim // 2, generator=g, dtype=torch.float64)
    cos, sin = (f(angle).repeat_interleave(2, -1).view(1, tokens, 1, dim) for f in (torch.cos, torch.sin))
    q, k = torch.ops.genq.wan_qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, dim)
    errs = []
    for part, (got, w) in enumerate(((q, wq), (k, wk))):
        norm = torch.nn.RMSNorm(c, eps=1e-6).to(dt)
        norm.weight.data = w
        ref = _rotate(norm(qkv[..., part * c:(part + 1) * c]).unflatten(2, (heads, dim)), cos, sin).double()
        errs.append(((got.unflatten(2, (heads, dim)).double() - ref).norm() / ref.norm()).item())
    out.append({"rel_l2": errs, "shape": list(q.shape), "dtype": str(q.dtype).removeprefix("torch.")})
print(json.dumps(out))
"""

PROCESSOR = r"""
import json, torch
from bench.models import build_wan
from pipelines import wan_fusions
from pipelines.accel import fuse_wan_qkv
from pipelines.wan_self_attention import SelfAttnProcessor, use_self_attention

calls = []
kernel = wan_fusions._qk_norm_rope
wan_fusions._qk_norm_rope = lambda *a: calls.append(a[0].shape) or kernel(*a)
# what takes() adds to fits() is a CUDA card and 16-bit activations: the interpreter runs fp32 on the CPU
wan_fusions.takes = lambda attn, h, rotary: wan_fusions.fits(attn, h.shape[1], rotary)
tr = build_wan("cpu", tiny=True).transformer.float()
g = torch.Generator().manual_seed(0)
x = torch.randn(1, tr.config.in_channels, 2, 16, 16, generator=g)
enc = torch.randn(1, 16, tr.config.text_dim, generator=g)
run = lambda: tr(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=enc, return_dict=False)[0]
with torch.no_grad():
    stock = run()
    fuse_wan_qkv(tr)
    use_self_attention(tr, SelfAttnProcessor, "native", fuse_qk=True)
    ours = run()
print(json.dumps({"rel_l2": ((ours - stock).norm() / stock.norm()).item(), "calls": [list(s) for s in calls]}))
"""


BLOCKS = r"""
import json, torch
from bench.models import build_wan
from pipelines import wan_fusions

out = {}
launch, fits = wan_fusions._launch, wan_fusions._fused_fits
# 64 rows a program over 2 videos x 112 tokens: programs that span both videos, the last one short
for dtype, rows in (("float32", 1), ("float16", 64)):
    wan_fusions.RESIDUAL_NORM = wan_fusions.Launch(rows=rows, warps=4)
    tr = build_wan("cpu", tiny=True).transformer.to(getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, tr.config.in_channels, 2, 16, 14, generator=g).to(tr.dtype)
    enc = torch.randn(2, 16, tr.config.text_dim, generator=g).to(tr.dtype)
    # two videos at different timesteps: each row takes its own video's modulation
    run = lambda: tr(hidden_states=x, timestep=torch.tensor([500, 300]), encoder_hidden_states=enc,
                     return_dict=False)[0]
    with torch.no_grad():
        stock = run()
        fused = wan_fusions.fuse_block_norms(tr)
        # what _fused_fits adds is a CUDA card and 16-bit activations: the interpreter runs on the CPU
        wan_fusions._fused_fits = lambda block, h, temb: temb.ndim == 3
        calls = []
        wan_fusions._launch = lambda *a: calls.append(a[1] is not None) or launch(*a)
        ours = run()
        wan_fusions._fused_fits = fits
    out[dtype] = {"fused": fused, "calls": calls,
                  "rel_l2": ((ours.double() - stock.double()).norm() / stock.double().norm()).item()}
print(json.dumps(out))
"""


def test_the_kernel_gives_diffusers_normalised_rotated_queries_and_keys():
    cases = [
        [1, 7, 2, 16, "float32", 1],  # 32 channels: the pairs fill the block exactly
        [2, 5, 3, 16, "float32", 1],  # two videos (the table's token index wraps), 48 channels: a masked block
        [1, 9, 2, 64, "float16", 1],  # a 16-bit dtype, rounded where aten's rms_norm rounds
        [2, 7, 3, 16, "float32", 4],  # 4 rows a program: programs across both videos, the last one short
    ]
    got = run_interpreted(KERNEL, json.dumps(cases))
    for (batch, tokens, heads, dim, dtype, _), row in zip(cases, got):
        assert row["shape"] == [batch, tokens, heads * dim] and row["dtype"] == dtype
        assert max(row["rel_l2"]) < (1e-6 if dtype == "float32" else 2e-3), row


def test_the_processor_takes_queries_and_keys_from_the_kernel_and_keeps_the_output():
    got = run_interpreted(PROCESSOR)
    tokens = 2 * 16 * 16 // 4
    assert got["calls"] == [[1, tokens, 3 * 24]] * 2  # each block's self-attention, from its q|k|v product
    assert got["rel_l2"] < 1e-5


def test_fused_blocks_compute_diffusers_norms_residuals_and_modulation():
    got = run_interpreted(BLOCKS)
    for dtype, tolerance in (("float32", 1e-6), ("float16", 1e-3)):
        row = got[dtype]
        assert row["fused"] == 2
        assert row["calls"] == [False, True, True] * 2  # each block: norm1, then two residual norms
        assert row["rel_l2"] < tolerance, row


@pytest.mark.slow
def test_fused_blocks_fall_back_off_the_gpu_and_carry_the_step_cache(tiny_wan_video):
    from pipelines.step_cache import set_wan_step_cache

    pipe = build_wan("cpu", tiny=True)

    def video():
        return tiny_wan_video(pipe, steps=3)
    before = video()
    assert wan_fusions.fuse_block_norms(pipe.transformer) == 2
    assert wan_fusions.fuse_block_norms(pipe.transformer) == 0  # once only
    assert torch.equal(video(), before)  # a CPU: diffusers' forward
    set_wan_step_cache(pipe, 0.05)
    assert torch.isfinite(video()).all()
    set_wan_step_cache(pipe, None)
    assert torch.equal(video(), before)
    assert all(b.forward.__func__ is wan_fusions.fused_block_forward for b in pipe.transformer.blocks)


def test_blocks_keep_diffusers_forward_when_it_is_not_the_one_restated(monkeypatch):
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    # a diffusers upgrade that changes the block's forward fails here first: recheck fused_block_forward
    # against it (tests above, bench.wan's equality on the GPU), then update MIRRORED_FORWARD
    assert wan_fusions.mirrors_diffusers()

    def changed(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        return hidden_states
    monkeypatch.setattr(WanTransformerBlock, "forward", changed)
    tr = build_wan("cpu", tiny=True).transformer
    assert not wan_fusions.mirrors_diffusers()
    assert wan_fusions.fuse_block_norms(tr) == 0
    assert all("forward" not in vars(b) for b in tr.blocks)


def _rotary(tokens: int, dim: int):
    table = torch.zeros(1, tokens, 1, dim)
    return table, table.clone()


def test_fits_refuses_layers_the_kernel_does_not_compute():
    tr = build_wan("cpu", tiny=True).transformer
    attn = tr.blocks[0].attn1
    assert not wan_fusions.fits(attn, 8, _rotary(8, 12))  # q, k and v still three products
    fuse_wan_qkv(tr)
    assert wan_fusions.fits(attn, 8, _rotary(8, 12))
    assert not wan_fusions.fits(attn, 8, None)  # no rotary embedding
    assert not wan_fusions.fits(attn, 9, _rotary(8, 12))  # a table for other tokens
    assert not wan_fusions.fits(attn, 8, _rotary(8, 6))  # a table for another head size
    cos, sin = _rotary(8, 24)
    assert not wan_fusions.fits(attn, 8, (cos[..., ::2], sin[..., ::2]))  # channels not contiguous
    attn.norm_k = torch.nn.RMSNorm(12)  # a norm per head, not across heads
    assert not wan_fusions.fits(attn, 8, _rotary(8, 12))
    assert not wan_fusions.takes(tr.blocks[1].attn1, torch.zeros(1, 8, 24), _rotary(8, 12))  # CPU, fp32


def test_the_gelu_module_computes_as_diffusers_and_every_block_gets_one():
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
    from pipelines.tiny_wan import _TRANSFORMER

    torch.manual_seed(0)
    stock = GELU(24, 32, approximate="tanh")
    ours = wan_fusions.GeluLinear(stock.proj)
    x = torch.randn(2, 5, 24)
    assert torch.equal(ours(x), stock(x))
    tr = WanTransformer3DModel(**_TRANSFORMER)
    tr.blocks[1].ffn.net[0].approximate = "none"  # the erf GELU: cuBLASLt's epilogue computes the tanh form only
    assert wan_fusions.gelu_in_epilogue(tr) == 1
    assert isinstance(tr.blocks[0].ffn.net[0], wan_fusions.GeluLinear) and type(tr.blocks[1].ffn.net[0]) is GELU
    assert wan_fusions.gelu_in_epilogue(tr) == 0  # once only


def test_the_gelu_module_falls_back_when_its_product_is_no_plain_linear():
    torch.manual_seed(0)
    stock = GELU(24, 32, approximate="tanh")
    ours = wan_fusions.GeluLinear(stock.proj)

    class Scaled(torch.nn.Linear):  # as an Fp8Linear (GENQ_WAN_LINEAR=fp8) replaces the product
        pass
    ours.proj = Scaled(24, 32)
    ours.proj.load_state_dict(stock.proj.state_dict())
    x = torch.randn(3, 24)
    assert torch.equal(ours(x), stock(x))


def test_the_switch_is_read_and_sets_the_processors():
    assert AccelOptions.from_env({}).wan_fuse is True
    assert AccelOptions.from_env({"GENQ_WAN_FUSE": "0"}).wan_fuse is False
    with pytest.raises(ValueError, match="GENQ_WAN_FUSE"):
        AccelOptions.from_env({"GENQ_WAN_FUSE": "sometimes"})
    tr = build_wan("cpu", tiny=True).transformer
    assert _wan_attention(tr, AccelOptions(wan_attention_backend="native")) == ["attention:native", "qk_norm_rope"]
    assert all(type(b.attn1.processor) is SelfAttnProcessor and b.attn1.processor.fuse_qk for b in tr.blocks)
    assert all(b.attn1.processor._attention_backend == "native" for b in tr.blocks)
    tr = build_wan("cpu", tiny=True).transformer
    assert _wan_attention(tr, AccelOptions(wan_attention_backend="native", wan_fuse=False)) == ["attention:native"]
    assert not any(isinstance(b.attn1.processor, SelfAttnProcessor) for b in tr.blocks)
