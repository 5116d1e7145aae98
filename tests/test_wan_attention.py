"""pipelines/wan_attention.py: WAN's self-attention through our processor (GENQ_WAN_ATTENTION=cudnn_strided),
on this CPU with diffusers' tiny WAN transformer (the processor's SDPA falls back to SDPA's own choice)."""
from __future__ import annotations

import torch

from bench.models import build_wan
from pipelines.accel import AccelOptions
from pipelines.wan_attention import StridedCudnnWanAttnProcessor, attention_bshd, use_self_attention


def _transformer_run():
    tr = build_wan("cpu", tiny=True).transformer.float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tr.config.in_channels, 2, 16, 16, generator=g)
    enc = torch.randn(1, 16, tr.config.text_dim, generator=g)
    return tr, lambda: tr(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=enc,
                          return_dict=False)[0]


def test_the_strided_processor_gives_diffusers_result_on_every_self_attention():
    tr, run = _transformer_run()
    with torch.no_grad():
        stock = run()
        assert use_self_attention(tr, StridedCudnnWanAttnProcessor, "native") == len(tr.blocks)
        ours = run()
    assert {type(b.attn1.processor) for b in tr.blocks} == {StridedCudnnWanAttnProcessor}
    assert not any(isinstance(b.attn2.processor, StridedCudnnWanAttnProcessor) for b in tr.blocks)  # cross: stock
    assert ((ours - stock).norm() / stock.norm()).item() < 1e-6


def test_attention_bshd_is_sdpa_over_the_heads_and_traces_as_one_op():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 24, 3, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2)).transpose(1, 2)
    got = attention_bshd(q, k, v)
    assert got.shape == (2, 24, 3, 16) and got.is_contiguous() and torch.allclose(got, ref, atol=1e-6)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    traced = torch.compile(lambda a, b, c: attention_bshd(a * 2, b, c), backend=backend, fullgraph=True)
    assert torch.allclose(traced(q, k, v), attention_bshd(q * 2, k, v), atol=1e-6)
    assert "genq.attention_bshd" in graphs[0].code  # opaque to the compiler: the layout it is given stays


def test_the_setting_takes_cudnn_strided():
    assert AccelOptions.from_env({"GENQ_WAN_ATTENTION": "cudnn_strided"}).wan_attention_backend == "cudnn_strided"
