"""pipelines.fp8 on CPU: Fp8Linear against the float layer, the UNet conversion, the GENQ_SDXL_FP8 switch.

torch's CPU _scaled_mm takes float8_e4m3fn operands with row-wise fp32 scales and a bf16 output, the
same call the GPU makes, so these tests run the daemon's code path (without the Hopper kernels' speed).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from bench.harness import compare
from bench.models import build_sdxl
from pipelines import accel
from pipelines.accel import AccelOptions, accelerate_sdxl
from pipelines.fp8 import FP8, Fp8Linear, convert_unet_linears, fits, token_linears

# e4m3 keeps 3 mantissa bits: every weight and activation element is rounded by up to 2^-4 of itself
# (uniform-ish, ~2-4% RMS relative error each). Summed over K products the errors partly cancel, so a
# layer's output lands at ~3-4% relative L2 from the float layer; 5e-2 leaves margin without hiding a
# wrong scale (a swapped or missing scale is off by orders of magnitude, a transposed weight by ~140%).
LAYER_REL_L2 = 5e-2
# A whole UNet chains several FP8 layers per block; random weights, so errors do not shrink as in
# trained models. Measured ~4e-2 on the tiny UNet below.
UNET_REL_L2 = 0.1


def _rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    return compare(ref, got)["rel_l2"]


def test_cpu_scaled_mm_takes_rowwise_float8():
    x, w = torch.randn(5, 32), torch.randn(48, 32)
    sx, sw = x.abs().amax(1, keepdim=True) / 448, w.abs().amax(1, keepdim=True) / 448
    y = torch._scaled_mm((x / sx).to(FP8), (w / sw).to(FP8).t(), scale_a=sx, scale_b=sw.t().contiguous(),
                         bias=None, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 48)
    assert _rel_l2(x @ w.t(), y) < LAYER_REL_L2


@pytest.mark.parametrize("shape", [(37, 64), (2, 19, 64), (2, 3, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_matches_the_float_layer(shape, bias, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias).to(dtype)
    with torch.no_grad():
        if bias:
            linear.bias.normal_()  # a bias as large as the product, so a lost or doubled bias shows
    x = torch.randn(shape, dtype=dtype)
    want = nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float() if bias else None)
    fp8 = Fp8Linear(linear)
    got = fp8(x)
    assert got.shape == (*shape[:-1], 96) and got.dtype == dtype
    assert _rel_l2(want, got) < LAYER_REL_L2
    assert fp8.weight_fp8.dtype == FP8 and fp8.weight_fp8.shape == (96, 64) and fp8.weight_fp8.is_contiguous()
    assert fp8.weight_scale.dtype == torch.float32 and fp8.weight_scale.shape == (96,)
    assert (fp8.bias is linear.bias) if bias else fp8.bias is None  # the layer's own bias, no copy
    assert [n for n, _ in fp8.named_parameters()] == (["bias"] if bias else [])  # no float weight kept


def test_zero_rows_and_zero_weights_stay_finite():
    linear = nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight[3] = 0
    x = torch.randn(4, 32)
    x[1] = 0
    got = Fp8Linear(linear)(x)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[1], linear.bias, atol=1e-2) and torch.allclose(got[:, 3], linear.bias[3].expand(4),
                                                                              atol=1e-2)


def test_fp8_linear_traces_into_one_graph():
    # no .item(), no branch on values: dynamo takes the whole forward (fullgraph raises on a graph break)
    fp8 = Fp8Linear(nn.Linear(64, 32))
    x = torch.randn(2, 10, 64)
    torch._dynamo.reset()
    compiled = torch.compile(fp8, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), fp8(x))


def test_layers_that_do_not_fit_are_refused():
    assert fits(nn.Linear(64, 32))
    assert not fits(nn.Linear(40, 32)) and not fits(nn.Linear(64, 40))  # K, N multiples of 16

    class Lora(nn.Linear):  # a subclass with its own forward is not ours to replace
        pass

    assert not fits(Lora(64, 32))
    with pytest.raises(ValueError):
        Fp8Linear(nn.Linear(64, 24))


def test_moving_keeps_float8_and_follows_the_device():
    linear = nn.Linear(64, 32)
    fp8 = Fp8Linear(linear)
    x = torch.randn(3, 64)
    want = fp8(x)
    fp8.to(torch.float16).to(torch.float32)  # a dtype cast leaves the float8 weight and fp32 scales alone
    assert fp8.weight_fp8.dtype == FP8 and fp8.weight_scale.dtype == torch.float32
    assert _rel_l2(want, fp8(x)) < 1e-3  # only the bias went through fp16
    fp8.to("meta")  # device moves (what .to("cuda") does): every tensor follows, dtypes kept
    assert {t.device.type for t in (fp8.weight_fp8, fp8.weight_scale, fp8.bias)} == {"meta"}
    assert fp8.weight_fp8.dtype == FP8 and fp8.weight_scale.dtype == torch.float32


def _tiny_unet(channels=(32, 64), cross=64) -> UNet2DConditionModel:
    """SDXL's layout (text_time embedding, linear projections, 2-layer transformer blocks), tiny sizes."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=cross, norm_num_groups=8).eval()


def _unet_inputs(cross=64, side=8):
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, side, side, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 77, cross, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)})


def _run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def _weight_bytes(unet) -> int:
    return sum(t.numel() * t.element_size() for t in unet.state_dict().values())


def test_unet_conversion_after_fused_qkv():
    unet = _tiny_unet()
    inputs = _unet_inputs()
    unet.fuse_qkv_projections()
    want = _run(unet, inputs)
    before = _weight_bytes(unet)
    chosen = set(token_linears(unet))
    report = convert_unet_linears(unet)

    assert report.layers == len(chosen) > 0 and report.kept == ()
    assert before - _weight_bytes(unet) == report.bytes_saved > 0  # one copy per weight, in float8
    blocks = [b for m in unet.modules() if hasattr(m, "transformer_blocks") for b in m.transformer_blocks]
    models = [m for m in unet.modules() if hasattr(m, "transformer_blocks")]
    assert len(blocks) == 2 + 2 * 2 + 2 and len(models) == 1 + 2 + 1  # 2-layer models: down 1, up 2, mid 1
    for block in blocks:
        for layer in (block.attn1.to_qkv, block.attn1.to_q, block.attn1.to_k, block.attn1.to_v,
                      block.attn1.to_out[0], block.attn2.to_q, block.attn2.to_out[0], block.ff.net[0].proj,
                      block.ff.net[2]):
            assert isinstance(layer, Fp8Linear)
        # cross-attention keys / values see only the text tokens: kept in float
        for layer in (block.attn2.to_k, block.attn2.to_v, block.attn2.to_kv):
            assert type(layer) is nn.Linear
    for model in models:
        assert isinstance(model.proj_in, Fp8Linear) and isinstance(model.proj_out, Fp8Linear)
    assert report.layers == 9 * len(blocks) + 2 * len(models)
    for layer in (unet.time_embedding.linear_1, unet.time_embedding.linear_2, unet.add_embedding.linear_1,
                  unet.add_embedding.linear_2):
        assert type(layer) is nn.Linear  # embeddings stay plain
    assert not any(isinstance(m, Fp8Linear) for m in unet.down_blocks[0].modules())  # no transformer there

    got = _run(unet, inputs)
    assert torch.isfinite(got).all() and _rel_l2(want, got) < UNET_REL_L2
    unet.to(torch.device("cpu"))  # what memory admission's moves do (.to("cpu") / .to("cuda"))
    assert torch.equal(_run(unet, inputs), got)
    unet.to("meta").to_empty(device="cpu")  # a real round trip off the device (values lost, layout kept)
    assert all(m.weight_fp8.dtype == FP8 and m.weight_fp8.device.type == "cpu"
               for m in unet.modules() if isinstance(m, Fp8Linear))


def test_layers_not_multiples_of_16_stay_plain():
    unet = _tiny_unet(channels=(32, 72), cross=40)  # transformer width 72: no K or N of 16s in its attention
    inputs = _unet_inputs(cross=40)
    want = _run(unet, inputs)
    report = convert_unet_linears(unet)
    kept = set(report.kept)
    assert "down_blocks.1.attentions.0.proj_in" in kept
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in kept
    for name in kept:
        assert type(unet.get_submodule(name)) is nn.Linear
    # the feed-forward output (288 -> 72) and its input (72 -> 576) have one bad side each: kept too
    assert report.layers == 0 and torch.equal(_run(unet, inputs), want)


def test_the_switch_comes_from_the_environment():
    assert AccelOptions.from_env({"GENQ_ACCEL": "1", "GENQ_SDXL_FP8": "1"}).sdxl_fp8 is True
    assert AccelOptions.from_env({"GENQ_ACCEL": "1"}).sdxl_fp8 is False  # opt-in
    assert AccelOptions().sdxl_fp8 is False


def _fp8_layers(pipe) -> int:
    return sum(isinstance(m, Fp8Linear) for m in pipe.unet.modules())


def test_accelerate_sdxl_converts_only_on_an_fp8_card(monkeypatch):
    opts = AccelOptions(enabled=True, sdxl_fp8=True)
    cpu = build_sdxl("cpu", dtype=torch.float32, tiny=True)
    assert accelerate_sdxl(cpu, opts) == ["fused_qkv", "bf16_vae"] and _fp8_layers(cpu) == 0  # a CPU: never

    # the card check, with a CPU pipeline standing in for one on a GPU
    monkeypatch.setattr(accel, "_on_cuda", lambda module: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # Ampere
    ampere = build_sdxl("cpu", dtype=torch.float32, tiny=True)
    assert accelerate_sdxl(ampere, opts) == ["fused_qkv", "bf16_vae", "channels_last"] and _fp8_layers(ampere) == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper
    hopper = build_sdxl("cpu", dtype=torch.float32, tiny=True)
    image = dict(prompt="a red cube", width=64, height=64, num_inference_steps=2, output_type="pt")
    want = hopper(generator=torch.Generator().manual_seed(3), **image).images
    applied = accelerate_sdxl(hopper, opts)
    n = _fp8_layers(hopper)
    assert applied == ["fused_qkv", "bf16_vae", "channels_last", f"fp8_linear:{n}"] and n > 0
    got = hopper(generator=torch.Generator().manual_seed(3), **image).images
    assert got.shape == want.shape and torch.isfinite(got).all()
