"""Tiny random-weight WAN 2.1 look-alikes, built locally (no hub) for tests and the demo.

`build_tiny_wan` writes a text-to-video folder (WanPipeline layout), `build_tiny_wan_vace` a VACE
folder (WanVACEPipeline layout). Both load with `from_pretrained(folder, subfolder=...)` exactly like
the real `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` / `Wan2.1-VACE-1.3B-diffusers` checkpoints. The text
encoder, tokenizer and VAE are built from the same seeds in both, so they are interchangeable, as
the real 1.3B T2V and VACE checkpoints' are.
"""
from __future__ import annotations

from pathlib import Path

TEXT_DIM = 32
# Like umt5: pad 0, eos 1, unk 2, a SentencePiece-style word marker; the rest are single characters.
_SPECIALS = ("<pad>", "</s>", "<unk>")
_PIECES = ("\u2581",) + tuple("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
# Kept small: the tiny transformer's rotary table only needs to cover a few latent positions.
_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,  # WAN's own value: positions cover the real sizes (832x480 -> 52 patches)
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(t, 0.0) for t in _SPECIALS] + [(p, -1.0) for p in _PIECES]
    unigram = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def _lively(model):
    """Variance-keeping weights: the default init shrinks signals through a few tiny layers so much
    that a conditioning frame moves the decoded video by less than one pixel step; tests must see it."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
    return model


def _shared_parts(out: Path) -> None:
    """Tokenizer, text encoder, VAE and scheduler: the same in both layouts."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    text_encoder.save_pretrained(out / "text_encoder")
    torch.manual_seed(0)
    vae = _lively(AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True]))
    vae.save_pretrained(out / "vae")
    # The real checkpoints ship this scheduler (flow matching, shift 3.0 for 480p).
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(out / "scheduler")


def _model_index(out: Path, pipeline_class: str, transformer_class: str) -> None:
    import json

    index = {
        "_class_name": pipeline_class,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", transformer_class],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny_wan(out_dir: str | Path) -> Path:
    """A tiny random-weight Wan 2.1 text-to-video folder (diffusers layout) in `out_dir`."""
    import torch
    from diffusers import WanTransformer3DModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _shared_parts(out)
    torch.manual_seed(0)
    _lively(WanTransformer3DModel(**_TRANSFORMER)).save_pretrained(out / "transformer")
    _model_index(out, "WanPipeline", "WanTransformer3DModel")
    return out


def build_tiny_wan_vace(out_dir: str | Path) -> Path:
    """A tiny random-weight Wan 2.1 VACE folder (diffusers layout) in `out_dir`."""
    import torch
    from diffusers import WanVACETransformer3DModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _shared_parts(out)
    torch.manual_seed(1)
    # vace_in_channels: 16 inactive + 16 reactive latent channels + 64 mask channels (8x8 pixels).
    _lively(WanVACETransformer3DModel(**_TRANSFORMER, vace_layers=[0, 1], vace_in_channels=96)).save_pretrained(
        out / "transformer")
    _model_index(out, "WanVACEPipeline", "WanVACETransformer3DModel")
    return out
