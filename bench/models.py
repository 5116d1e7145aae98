"""Random-weight builders of the served architectures, full size (from architectures.json) or tiny.

Speed and memory do not depend on weight values, so the benchmark builds the published
architectures directly on the target device instead of loading checkpoints.  Two output layers
are rescaled after a calibration forward so that the random networks produce values of the
magnitude real weights do (unit-variance noise predictions, images near [-1, 1]); otherwise 25
Euler steps on an uncalibrated UNet drift far outside the fp16 range the baseline relies on.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

ARCH = json.loads((Path(__file__).with_name("architectures.json")).read_text())


def _arch(prefix: str) -> dict:
    return next(v for k, v in ARCH.items() if k.startswith(prefix))


def clip_tokenizer():
    """A CLIP BPE tokenizer with a character vocabulary: no hub access, ids stay inside any CLIP vocab."""
    from transformers import CLIPTokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder = Path(tempfile.mkdtemp(prefix="clip_tok_"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _sdxl_configs(tiny: bool):
    if not tiny:
        unet = dict(_arch("sdxl_unet"))
        vae = dict(_arch("sdxl_vae"))
        te1, te2 = dict(_arch("sdxl_text_encoder ")), dict(_arch("sdxl_text_encoder_2"))
        return unet, vae, te1, te2
    unet = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=16,
    )
    vae = dict(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    te = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    return unet, vae, te, dict(te)


@torch.no_grad()
def _calibrate(module_out: torch.nn.Module, run, target_std: float) -> None:
    std = run().float().std().item()
    if std > 0:
        module_out.weight.mul_(target_std / std)
        if module_out.bias is not None:
            module_out.bias.mul_(target_std / std)


def build_sdxl(device: str = "cuda", dtype=torch.float16, tiny: bool = False, seed: int = 0):
    """StableDiffusionXLPipeline with random weights, the pipeline's default (Euler) scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg, vae_cfg, te1_cfg, te2_cfg = _sdxl_configs(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg).to(dtype)
        vae = AutoencoderKL(**vae_cfg).to(dtype)
        te1 = CLIPTextModel(CLIPTextConfig(**te1_cfg)).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg)).to(dtype)
    sched_cfg = dict(_arch("sdxl_scheduler"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
        unet=unet, scheduler=EulerDiscreteScheduler(**sched_cfg),
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    _calibrate_sdxl(pipe)
    return pipe


@torch.no_grad()
def _calibrate_sdxl(pipe) -> None:
    unet, vae = pipe.unet, pipe.vae
    dev, dt = unet.device, unet.dtype
    g = torch.Generator(dev).manual_seed(1)
    lat = torch.randn(2, 4, 32, 32, device=dev, dtype=dt, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device=dev, dtype=dt, generator=g)
    pooled = pipe.text_encoder_2.config.projection_dim
    added = {"text_embeds": torch.randn(2, pooled, device=dev, dtype=dt, generator=g),
             "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, device=dev, dtype=dt)}
    _calibrate(unet.conv_out, lambda: unet(lat, 500, ctx, added_cond_kwargs=added).sample, 1.0)
    z = torch.randn(1, 4, 32, 32, device=dev, dtype=vae.dtype, generator=g)
    _calibrate(vae.decoder.conv_out, lambda: vae.decode(z / vae.config.scaling_factor).sample, 0.5)


def wan_transformer_config(tiny: bool) -> dict:
    if not tiny:
        return dict(_arch("wan2_1_t2v_1_3b_transformer"))
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def build_wan(device: str = "cuda", tiny: bool = False, seed: int = 0, **transformer_overrides):
    """WanPipeline: bf16 transformer, fp32 VAE (the diffusers docs' recipe), no text encoder.

    Jobs are timed from prompt embeddings; the umT5 encoder is built separately (build_umt5) for
    its memory figures. `transformer_overrides` replace config keys (bench.full_models gives the tiny
    transformer WAN's own rope table, so that real video sizes fit).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    vae_cfg = {} if not tiny else dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[False, True, True])
    with torch.device(device):
        transformer = WanTransformer3DModel(**{**wan_transformer_config(tiny), **transformer_overrides}).to(torch.bfloat16)
        vae = AutoencoderKLWan(**vae_cfg).to(torch.float32)
    _keep_fp32_like_from_pretrained(transformer)
    sched_cfg = {k: v for k, v in _arch("wan2_1_scheduler").items()}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=UniPCMultistepScheduler(**sched_cfg))
    pipe.set_progress_bar_config(disable=True)
    for m in (transformer, vae):
        m.eval().requires_grad_(False)
    _calibrate_wan(pipe)
    return pipe


def _keep_fp32_like_from_pretrained(model) -> None:
    """from_pretrained(torch_dtype=bf16) keeps these modules in fp32; a plain .to(bf16) would not."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.to(torch.float32)


@torch.no_grad()
def _calibrate_wan(pipe) -> None:
    tr = pipe.transformer
    dev = tr.device
    g = torch.Generator(dev).manual_seed(1)
    x = torch.randn(1, 16, 2, 16, 16, device=dev, dtype=torch.bfloat16, generator=g)
    ctx = torch.randn(1, 16, tr.config.text_dim, device=dev, dtype=torch.bfloat16, generator=g)
    t = torch.tensor([500], device=dev)
    _calibrate(tr.proj_out, lambda: tr(x, t, ctx, return_dict=False)[0], 1.0)


def wan_text_dim(pipe) -> int:
    return pipe.transformer.config.text_dim


def build_umt5(device: str = "cuda", tiny: bool = False):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = dict(_arch("wan2_1_text_encoder")) if not tiny else dict(
        vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    with torch.device(device):
        model = UMT5EncoderModel(UMT5Config(**cfg)).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def qwen_config(tiny: bool):
    from transformers import Qwen2Config

    cfg = dict(_arch("qwen2_5_7b")) if not tiny else dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False)
    return Qwen2Config(**cfg)


def build_qwen(device: str = "cuda", tiny: bool = False, seed: int = 0):
    """Qwen2ForCausalLM in bf16, initialised in bf16 on the device (7.6 B parameters in seconds)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(qwen_config(tiny))
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    # Random weights would emit the end-of-text id at random: benchmarks decode a fixed length.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
