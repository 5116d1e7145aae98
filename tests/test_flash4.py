"""GENQ_WAN_ATTENTION=flash4: the WAN processor routes the plain self- and text cross-attention through the
FlashAttention-4 op (here the package's function is stood in for by SDPA on the CPU, with its signature
and (out, lse) return), and a card or install that cannot run it is refused naming the switch. The kernel
itself runs on the GPU only: bench/fp8_attention.py and bench/wan_profile.py measure it there."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from bench.models import build_wan
from pipelines import flash4
from pipelines.accel import AccelOptions
from pipelines.wan_self_attention import Flash4WanAttnProcessor, use_self_attention


def _sdpa_as_flash4(calls: list):
    def kernel(q, k, v):
        calls.append((tuple(q.shape), tuple(k.shape)))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), None
    return kernel


def test_the_processor_changes_only_who_computes_self_and_cross_attention(monkeypatch):
    calls: list = []
    monkeypatch.setattr(flash4, "_kernel", lambda: _sdpa_as_flash4(calls))
    monkeypatch.setattr(flash4, "takes", lambda q, k, v: True)  # the real check wants CUDA tensors
    tr = build_wan("cpu", tiny=True).transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tr.config.in_channels, 2, 16, 16, generator=g).bfloat16()
    enc = torch.randn(1, 16, tr.config.text_dim, generator=g).bfloat16()
    with torch.no_grad():
        run = lambda: tr(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=enc,  # noqa: E731
                         return_dict=False)[0]
        stock = run()
        assert use_self_attention(tr, Flash4WanAttnProcessor, "native") == len(tr.blocks) == 2
        ours = run()
    assert torch.equal(ours, stock)
    tokens = 2 * 16 * 16 // 4  # latent frames x (16/2)^2 patches
    heads = (tr.config.num_attention_heads, tr.config.attention_head_dim)
    video, text = (1, tokens, *heads), (1, 16, *heads)
    assert calls == [(video, video), (video, text)] * 2  # each block: self-attention, then to the text


def test_shapes_the_kernel_does_not_take_stay_on_the_backend(monkeypatch):
    calls: list = []
    monkeypatch.setattr(flash4, "_kernel", lambda: _sdpa_as_flash4(calls))
    q = torch.zeros(1, 8, 2, 32, dtype=torch.bfloat16)
    assert not flash4.takes(q, q, q)  # CPU tensors
    assert Flash4WanAttnProcessor().attention(q, q, q) is None and calls == []


@pytest.mark.parametrize("shapes, dtype", [
    (((1, 8, 2, 32), (1, 8, 2, 32), (1, 9, 2, 32)), torch.bfloat16),  # keys and values of different lengths
    (((1, 8, 2, 32), (1, 8, 4, 32), (1, 8, 4, 32)), torch.bfloat16),  # grouped heads: not WAN's, not taken
    (((2, 8, 2, 32), (1, 8, 2, 32), (1, 8, 2, 32)), torch.bfloat16),  # batch sizes that differ
    (((1, 8, 2, 12),) * 3, torch.bfloat16),  # head dim not a multiple of 8
    (((1, 8, 2, 512),) * 3, torch.bfloat16),  # head dim past 256
    (((1, 8, 2, 32),) * 3, torch.float32),
])
def test_takes_refuses_what_the_hopper_forward_cannot_run(shapes, dtype, monkeypatch):
    tensors = [torch.zeros(s, dtype=dtype) for s in shapes]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert flash4.takes(*[torch.zeros(s, dtype=torch.bfloat16) for s in [(1, 8, 2, 32)] * 3])
    assert not flash4.takes(*tensors)


def test_the_switch_is_read_and_a_card_or_install_without_it_is_refused(monkeypatch):
    assert AccelOptions.from_env({"GENQ_WAN_ATTENTION": "flash4"}).wan_attention_backend == "flash4"
    with pytest.raises(RuntimeError, match="GENQ_WAN_ATTENTION=flash4 needs a Hopper or Blackwell"):
        flash4.check_device(torch.device("cpu"))
    flash4._kernel.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # the package not installed
    try:
        with pytest.raises(RuntimeError, match=r"GENQ_WAN_ATTENTION=flash4 needs the flash-attn-4 package"):
            flash4._kernel()
    finally:
        flash4._kernel.cache_clear()


def test_a_compile_cache_folder_keeps_flash4s_kernels_too_unless_the_operator_chose_one(monkeypatch, tmp_path):
    from pipelines.accel import configure_compile_cache

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASH_ATTENTION_CUTE_DSL")}
    monkeypatch.setattr(os, "environ", env)
    configure_compile_cache(str(tmp_path))
    assert env["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path / "flash4")
    env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = "/srv/own"
    configure_compile_cache(str(tmp_path))
    assert env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == "/srv/own"


@pytest.mark.parametrize("usable, chosen", [(True, "flash4"), (False, "_native_cudnn")])
def test_auto_runs_flash4_where_it_can_and_cudnn_elsewhere(monkeypatch, usable, chosen):
    from pipelines.accel import _wan_attention

    assert AccelOptions.from_env({}).wan_attention_backend == "auto"
    monkeypatch.setattr(flash4, "usable", lambda device: usable)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend("_native_cudnn") sets diffusers' process-wide backend too: restored after the test,
    # which cuDNN on a CPU would otherwise fail
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    tr = build_wan("cpu", tiny=True).transformer
    assert _wan_attention(tr, AccelOptions(wan_fuse=False)) == [f"attention:{chosen}"]
    assert all(isinstance(b.attn1.processor, Flash4WanAttnProcessor) == usable for b in tr.blocks)
    assert all(b.attn2.processor._attention_backend == "_native_cudnn" for b in tr.blocks)


@pytest.mark.parametrize("usable", [True, False])
def test_fp8_attention_sends_the_text_cross_attention_to_flash4_where_it_runs(monkeypatch, usable):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from pipelines import wan_fp8_attention
    from pipelines.accel import _wan_attention

    monkeypatch.setattr(flash4, "usable", lambda device: usable)
    monkeypatch.setattr(wan_fp8_attention, "check_device", lambda device: None)  # a CPU has no 8-bit products
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    tr = build_wan("cpu", tiny=True).transformer
    applied = _wan_attention(tr, AccelOptions(wan_attention_backend="fp8", wan_fuse=False))
    assert applied == ["attention:fp8"] + (["cross_attention:flash4"] if usable else [])
    assert all(isinstance(b.attn1.processor, wan_fp8_attention.Fp8WanAttnProcessor) for b in tr.blocks)
    cross = Flash4WanAttnProcessor if usable else WanAttnProcessor
    assert all(type(b.attn2.processor) is cross for b in tr.blocks)
    assert all(b.attn2.processor._attention_backend == "_native_cudnn" for b in tr.blocks)


def test_usable_is_false_without_a_hopper_or_blackwell_card_or_the_package(monkeypatch):
    assert not flash4.usable(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    flash4._kernel.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # the package not installed
    try:
        assert not flash4.usable(torch.device("cuda"))
    finally:
        flash4._kernel.cache_clear()
