"""pipelines.accel on CPU: switches, equal results of the eager levers, FastDecoder against generate()."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from bench.harness import compare
from bench.models import build_qwen, build_sdxl, build_wan
from pipelines.accel import AccelOptions, FastDecoder, accelerate_sdxl, accelerate_wan, set_wan_step_cache, top_p_sampler


def test_options_come_from_the_environment():
    opts = AccelOptions.from_env({"GENQ_ACCEL": "1", "GENQ_COMPILE": "true", "GENQ_COMPILE_CACHE_DIR": "/c"})
    assert (opts.enabled, opts.compile, opts.cache_dir) == (True, True, "/c")
    assert AccelOptions.from_env({"GENQ_COMPILE": "1"}).compile is False  # compile only on top of accel
    assert AccelOptions.from_env({}) == AccelOptions()


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    return build_sdxl("cpu", dtype=torch.float32, tiny=True)


def _image(pipe, **kw):
    return pipe(prompt="a red cube", width=64, height=64, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(3), **kw).images


def test_disabled_accel_changes_nothing(sdxl):
    assert accelerate_sdxl(sdxl, AccelOptions()) == []
    assert sdxl.vae.dtype == torch.float32 and sdxl.vae.config.force_upcast


@pytest.mark.slow
def test_sdxl_levers_keep_the_image_and_img2img_follows(sdxl):
    before = _image(sdxl)
    applied = accelerate_sdxl(sdxl, AccelOptions(enabled=True, compile=True))
    assert applied == ["fused_qkv", "bf16_vae"]  # no compile on a CPU
    after = _image(sdxl)
    assert compare(before, after)["psnr_db_if_unit_range"] > 40
    img2img = StableDiffusionXLImg2ImgPipeline(**sdxl.components)
    out = img2img(prompt="x", image=before, strength=0.5, num_inference_steps=2, output_type="pt").images
    assert out.shape == before.shape and torch.isfinite(out).all()
    assert sdxl.vae.dtype == torch.bfloat16  # img2img's encode did not upcast the shared VAE


@pytest.mark.slow
def test_wan_levers_and_step_cache_toggle():
    pipe = build_wan("cpu", tiny=True)
    emb = torch.randn(1, 16, 32, dtype=torch.bfloat16)

    def video():
        return pipe(prompt_embeds=emb, negative_prompt_embeds=emb, height=32, width=32, num_frames=5,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    before = video()
    assert accelerate_wan(pipe, AccelOptions(enabled=True, wan_vae_bf16=True)) == ["bf16_vae"]
    assert compare(before, video())["psnr_db_if_unit_range"] > 35
    set_wan_step_cache(pipe, 0.05)
    assert torch.isfinite(video()).all()
    set_wan_step_cache(pipe, None)
    assert compare(before, video())["psnr_db_if_unit_range"] > 35  # off again: same path as before


@pytest.fixture(scope="module")
def qwen():
    return build_qwen("cpu", tiny=True)


def test_fast_decoder_matches_generate_on_left_padded_batches(qwen):
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    ref = qwen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, 12:].tolist()
    got = FastDecoder(qwen, max_len=64, compile=True).generate(ids, mask, [10, 7])
    assert got == [ref[0], ref[1][:7]]


def test_fast_decoder_stops_rows_at_end_of_text(qwen):
    ids = torch.randint(5, 1000, (1, 8))
    first = FastDecoder(qwen, max_len=32, compile=False).generate(ids, torch.ones_like(ids), 6)[0]
    stop = first[2]
    again = FastDecoder(qwen, max_len=32, compile=False).generate(ids, torch.ones_like(ids), 6, eos_token_ids=[stop])
    assert again == [first[: first.index(stop) + 1]]
    with pytest.raises(ValueError):
        FastDecoder(qwen, max_len=10, compile=False).generate(ids, torch.ones_like(ids), 6)


def test_top_p_sampler_keeps_to_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -10.0, -10.0]] * 64)
    picks = top_p_sampler(1.0, 0.9, torch.Generator().manual_seed(0))(logits)
    assert set(picks.tolist()) <= {0, 1}
    assert top_p_sampler(0.0, 0.9)(logits).tolist() == [0] * 64
