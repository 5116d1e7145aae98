"""A tiny random-weight SDXL for tests and the demo: same classes and layout as the real model.

`build_tiny_sdxl(out_dir)` writes, from fixed seeds and without any download:

    out_dir/                       a diffusers folder (model_index.json, unet/, vae/, text_encoder{,_2}/,
                                   tokenizer{,_2}/, scheduler/), what SDXL_MODEL_PATH=tiny loads
    out_dir/sdxl_tiny.safetensors  the same weights as ONE checkpoint in the original SDXL (LDM) key layout
                                   (model.diffusion_model.*, first_stage_model.*, conditioner.embedders.*),
                                   the format operators have; diffusers' from_single_file converts it back
    out_dir/config/                the weight-free config folder from_single_file needs offline
                                   (what SDXL_CONFIG_PATH points at for a real checkpoint)

The inverse key mapping below mirrors diffusers.loaders.single_file_utils (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_open_clip_checkpoint); the loading tests prove the round trip.
Sizes are chosen so that diffusers recognises the file as SDXL base: the OpenCLIP encoder has at least
10 layers (the `xl_base` marker key is resblock 9) and the two text encoders differ in width (otherwise
from_single_file would load the CLIP-L weights into the OpenCLIP encoder).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SINGLE_FILE_NAME = "sdxl_tiny.safetensors"
CONFIG_DIR_NAME = "config"

_TIME_EMBED_DIM = 8
_TE1_WIDTH, _TE2_WIDTH, _POOLED_DIM = 32, 48, 32
_VAE_KEY, _UNET_KEY = "first_stage_model.", "model.diffusion_model."
_TE1_KEY, _TE2_KEY = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
# SDXL base's own training schedule (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json).
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                  interpolation_type="linear", use_karras_sigmas=False)


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> None:
    out_dir = Path(out_dir)
    pipe = _tiny_pipeline(seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(out_dir, out_dir / CONFIG_DIR_NAME,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", CONFIG_DIR_NAME))
    save_file(to_ldm_state_dict(pipe), out_dir / SINGLE_FILE_NAME)


def _tiny_pipeline(seed: int) -> StableDiffusionXLPipeline:
    vocab, merges = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")  # SDXL's second tokenizer pads with "!"

    def clip_config(width: int, layers: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=4, vocab_size=len(vocab), max_position_embeddings=77,
                              hidden_act=act, projection_dim=_POOLED_DIM, pad_token_id=vocab["!"],
                              bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(_TE1_WIDTH, 2, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(_TE2_WIDTH, 10, "gelu"))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
        cross_attention_dim=_TE1_WIDTH + _TE2_WIDTH, transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + _POOLED_DIM,
    )
    # Four blocks like the real VAE, so images are 8x the latents.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64, scaling_factor=0.13025, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level BPE alphabet (every byte, alone and word-final) plus a few merges."""
    chars = sorted(ByteLevel.alphabet())
    merges = [("t", "h"), ("a", "n"), ("i", "n"), ("th", "e</w>"), ("o", "n</w>"), ("c", "a")]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


# --- diffusers -> original SDXL (LDM) key layout ------------------------------------------------------

def to_ldm_state_dict(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in _unet_to_ldm(pipe.unet).items():
        out[_UNET_KEY + key] = value
    for key, value in _vae_to_ldm(pipe.vae).items():
        out[_VAE_KEY + key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        out[_TE1_KEY + "text_model." + key.removeprefix("text_model.")] = value
    for key, value in _open_clip_to_ldm(pipe.text_encoder_2).items():
        out[_TE2_KEY + key] = value
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    cfg = unet.config
    per_level = cfg.layers_per_block + 1  # LDM numbers the down/up-sampler as one more layer of its level
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}

    def renamed(kind: str, rest: str) -> str:
        if kind == "attentions":  # LDM's SpatialTransformer uses diffusers' inner names
            return rest
        head, _, tail = rest.partition(".")
        return f"{_UNET_RESNET[head]}.{tail}"

    def layer(kind: str, rest: str) -> str:  # a level's layer holds a resnet (slot 0) then an attention (slot 1)
        return f"{0 if kind == 'resnets' else 1}.{renamed(kind, rest)}"

    out = {}
    for key, value in unet.state_dict().items():
        if key in fixed:
            new = fixed[key]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"input_blocks.{1 + level * per_level + idx}.{layer(kind, rest)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            position = 2 * int(m[2]) if m[1] == "resnets" else 1
            new = f"middle_block.{position}.{renamed(m[1], m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"output_blocks.{level * per_level + idx}.{layer(kind, rest)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m[1])
            slot = 2 if "CrossAttn" in cfg.up_block_types[level] else 1
            new = f"output_blocks.{level * per_level + cfg.layers_per_block}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[new] = value
    return out


_VAE_BLOCK_PART = {"resnets": "block", "downsamplers.0": "downsample", "upsamplers.0": "upsample"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        if key in fixed:
            new = fixed[key]
        elif m := re.fullmatch(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|\w+samplers\.0)\.(.+)", key):
            side, level, part, rest = m[1], int(m[2]), m[3], m[4]
            if side == "decoder.up":  # LDM numbers decoder levels like the encoder: 0 is full size
                level = levels - 1 - level
            new = f"{side}.{level}.{_VAE_BLOCK_PART[part]}.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # LDM keeps these projections as 1x1 convolutions
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def _open_clip_to_ldm(model: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value.T if key == "text_projection.weight" else value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            n, module, kind = m[1], m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module.endswith("q_proj"):  # OpenCLIP packs q, k, v into one projection
                    prefix = f"text_model.encoder.layers.{n}.self_attn"
                    packed = torch.cat([sd[f"{prefix}.{p}_proj.{kind}"] for p in "qkv"])
                    out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = packed
            else:
                out[f"transformer.resblocks.{n}.{_OPEN_CLIP_LAYER[module]}.{kind}"] = value
        else:
            raise KeyError(f"no LDM name for OpenCLIP key {key}")
    return out
