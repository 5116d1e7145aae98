"""pipelines/fp8_attention.py (int8 Q K^T, e4m3 P V) and its WAN processor (GENQ_WAN_ATTENTION=fp8).

The kernels run on this CPU through Triton's interpreter, in a child process (the interpreter must be on
before Triton compiles anything). The interpreter's own fp32 -> e4m3 conversion rounds values just under
128 to 64 (the GPU's conversion does not), about 1.5% of the e4m3 values; tolerances against exact
attention allow for it (on an H100 the difference is rel. L2 3.9%, bench.fp8_attention)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from pipelines import fp8_attention as fa  # noqa: E402
from pipelines.accel import AccelOptions  # noqa: E402
from tests.interpreted import run_interpreted  # noqa: E402


KERNEL = r"""
import json, sys, torch
import torch.nn.functional as F
from pipelines import fp8_attention as fa

rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
out = []
for b, s, h, d, qk, cfg in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(torch.bfloat16) for _ in range(3))
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    cfg = fa.Config(*cfg)
    got = fa.attention(q, k, v, cfg=cfg, qk=qk)
    x = fa.quantise(q, k, v, qk=qk)
    pad = x.q.shape[2]
    # a strided view (every other head of a wider tensor) gives the same result as its contiguous copy
    wide = torch.stack((q, q), dim=3).flatten(2, 3)[:, :, ::2]
    out.append({"shape": list(got.shape), "dtype": str(got.dtype), "vs_exact": rel(got, exact),
                "vs_reference": rel(got, fa.reference(x, s)), "same_twice": torch.equal(got, fa.attention(q, k, v, cfg=cfg, qk=qk)),
                # smoothing: an offset shared by every key (softmax ignores it) costs K no precision
                "k_offset": rel(fa.attention(q, k + 8, v, cfg=cfg, qk=qk), exact),
                "strided": torch.equal(fa.attention(wide, k, v, cfg=cfg, qk=qk), got),
                "q_dtype": str(x.q.dtype), "v_dtype": str(x.v.dtype), "padded": pad,
                "padding_zero": all(float(t.float().abs().max()) == 0 for t in (x.q[:, :, s:], x.k[:, :, s:], x.v[..., s:]))
                if pad > s else True,
                "compiled_same": torch.equal(torch.compile(lambda q, k, v: fa.attention(q, k, v, cfg=cfg, qk=qk),
                                                           backend="aot_eager", fullgraph=True)(q, k, v), got)})
print(json.dumps(out))
"""

PROCESSOR = r"""
import json, torch
import torch.nn.functional as F
from bench.models import build_wan
from pipelines import fp8_attention, wan_fp8_attention

rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
out = {}
for head_dim in (16, 12):  # 12: not a power of two, the processor stays exact
    tr = build_wan("cpu", tiny=True, attention_head_dim=head_dim).transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tr.config.in_channels, 2, 16, 16, generator=g).bfloat16()
    enc = torch.randn(1, 16, tr.config.text_dim, generator=g).bfloat16()
    run = lambda: tr(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=enc, return_dict=False)[0]
    with torch.no_grad():
        stock = run()
        blocks = wan_fp8_attention.use_fp8_attention(tr, "native")  # no cuDNN on a CPU
        fp8 = run()
        kernel = fp8_attention.attention
        fp8_attention.attention = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        body = run()  # the processor's own projections, norms and RoPE with exact attention
        fp8_attention.attention = kernel
    out[head_dim] = {"blocks": blocks, "processors": sorted({type(b.attn1.processor).__name__ for b in tr.blocks}),
                     "cross": sorted({type(b.attn2.processor).__name__ for b in tr.blocks}),
                     "body_equal": torch.equal(body, stock), "fp8_vs_stock": rel(fp8, stock)}
print(json.dumps(out))
"""


def test_the_kernels_compute_attention_from_8_bit_operands():
    cases = [
        [2, 300, 2, 32, "int8", [64, 64, 4, 1]],  # tokens not a multiple of the blocks: masked, padded keys
        [1, 256, 1, 64, "int8", [64, 128, 4, 1]],  # whole blocks only
        [1, 70, 3, 16, "fp8", [64, 128, 4, 1]],  # Q and K in e4m3 (the variant the bench compares)
    ]
    for (b, s, h, d, qk, _), res in zip(cases, run_interpreted(KERNEL, json.dumps(cases))):
        assert res["shape"] == [b, s, h, d] and res["dtype"] == "torch.bfloat16"
        assert res["vs_exact"] < (0.12 if qk == "int8" else 0.16), res
        assert res["vs_reference"] < 0.1, res  # what P's e4m3 rounding adds to the quantised operands
        assert res["same_twice"] and res["strided"] and res["padding_zero"] and res["compiled_same"]
        assert res["k_offset"] < 1.2 * res["vs_exact"] + 0.02, res
        assert res["q_dtype"] == ("torch.int8" if qk == "int8" else "torch.float8_e4m3fn")
        assert res["v_dtype"] == "torch.float8_e4m3fn" and res["padded"] % fa.KB == 0


def test_the_wan_processor_changes_only_the_attention_product():
    res = run_interpreted(PROCESSOR)
    fp8, exact = res["16"], res["12"]
    for r in (fp8, exact):
        assert r["blocks"] == 2 and r["processors"] == ["Fp8WanAttnProcessor"]
        assert r["body_equal"]  # projections, norms, RoPE and output exactly as diffusers' processor
    assert 0 < fp8["fp8_vs_stock"] < 0.05
    assert exact["fp8_vs_stock"] == 0  # head dim 12: the kernel does not take it, attention stays exact


@pytest.mark.parametrize("shapes, dtype, match", [
    (((1, 8, 2, 32), (1, 8, 2, 32), (1, 9, 2, 32)), torch.bfloat16, "not one self-attention shape"),
    (((1, 8, 2, 24),) * 3, torch.bfloat16, "head dim 24"),
    (((1, 8, 2, 32),) * 3, torch.float32, "not bf16 or fp16"),
])
def test_inputs_the_kernel_does_not_take_are_refused_with_the_reason(shapes, dtype, match):
    q, k, v = (torch.zeros(s, dtype=dtype) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fa.attention(q, k, v)


def test_bad_blocks_and_types_are_refused():
    q = torch.zeros(1, 8, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must divide"):
        fa.attention(q, q, q, cfg=fa.Config(block_m=96))
    with pytest.raises(ValueError, match="qk 'int4'"):
        fa.attention(q, q, q, qk="int4")


def test_the_setting_selects_it_and_a_card_without_8_bit_products_is_refused():
    from pipelines.wan_fp8_attention import check_device

    assert AccelOptions.from_env({"GENQ_WAN_ATTENTION": "fp8"}).wan_attention_backend == "fp8"
    with pytest.raises(RuntimeError, match="GENQ_WAN_ATTENTION=fp8"):
        check_device(torch.device("cpu"))


def test_vace_hint_blocks_get_the_processor_too():
    from diffusers import WanVACETransformer3DModel

    from pipelines.tiny_wan import _TRANSFORMER
    from pipelines.wan_fp8_attention import Fp8WanAttnProcessor, use_fp8_attention

    tr = WanVACETransformer3DModel(**_TRANSFORMER, vace_layers=[0, 1], vace_in_channels=96)
    assert use_fp8_attention(tr, "native") == len(tr.blocks) + len(tr.vace_blocks) == 4
    for block in [*tr.blocks, *tr.vace_blocks]:
        assert isinstance(block.attn1.processor, Fp8WanAttnProcessor)
        assert not isinstance(block.attn2.processor, Fp8WanAttnProcessor)  # cross-attention stays exact
