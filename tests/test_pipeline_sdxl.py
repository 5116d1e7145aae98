"""SdxlPipeline on the tiny random-weight SDXL: real diffusers pipelines, CPU, 64x64, 2 steps."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from pipelines.loading import resolve_model_path
from pipelines.sdxl import SdxlPipeline, SdxlSettings
from pipelines.tiny_sdxl import CONFIG_DIR_NAME, SINGLE_FILE_NAME, build_tiny_sdxl
from schemas.common import Reference
from schemas.errors import PayloadError
from schemas.sdxl import SdxlRequest
from schemas.settings import Settings


def request(**fields) -> SdxlRequest:
    base = dict(job_id="job-1", user_id="user-1", job_type="sdxl_image_fast", prompt="a red fox in snow",
                width=64, height=64, steps=2, guidance_scale=5.0, num_images=1, seeds=[7])
    return SdxlRequest(**{**base, **fields})


def img2img(**fields) -> SdxlRequest:
    return request(**{"reference": Reference(source="user-library/u/ref.png"), "steps": 4, "strength": 0.5, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def same(a: Image.Image, b: Image.Image, tol: int = 0) -> bool:
    return a.size == b.size and int(np.abs(pixels(a) - pixels(b)).max()) <= tol


def solid(color: str, size=(80, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and idle OpenMP threads spin on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def settings(tiny_cache) -> Settings:
    return Settings(SDXL_MODEL_PATH="tiny", GENQ_TINY_CACHE=str(tiny_cache), GENQ_DEVICE="cpu")


@pytest.fixture(scope="module")
def sdxl(settings) -> SdxlPipeline:
    pipe = SdxlPipeline(settings)
    pipe.setup()
    return pipe


@pytest.fixture(scope="module")
def tiny_dir(sdxl, tiny_cache):
    return tiny_cache / "sdxl"


def test_settings_take_the_environment_names(settings, tiny_cache):
    assert settings.sdxl_model_path == "tiny" and settings.tiny_cache_dir == tiny_cache


def test_tiny_model_is_built_once_and_shares_weights(sdxl, tiny_dir, settings):
    assert (tiny_dir / "model_index.json").is_file() and (tiny_dir / SINGLE_FILE_NAME).is_file()
    assert not list((tiny_dir / CONFIG_DIR_NAME).rglob("*.safetensors"))

    def must_not_build(path):
        raise AssertionError("rebuilt a cached tiny model")

    assert resolve_model_path("tiny", "sdxl", settings, must_not_build) == tiny_dir
    assert sdxl.img2img.unet is sdxl.txt2img.unet and sdxl.img2img.vae is sdxl.txt2img.vae
    assert sdxl.dtype == torch.float32 and sdxl.device.type == "cpu"


def test_single_file_checkpoint_loads_the_same_model(sdxl, tiny_dir, tiny_cache):
    settings = Settings(SDXL_MODEL_PATH=str(tiny_dir / SINGLE_FILE_NAME), GENQ_TINY_CACHE=str(tiny_cache),
                        GENQ_DEVICE="cpu")
    single = SdxlPipeline(settings, SdxlSettings(SDXL_CONFIG_PATH=tiny_dir / CONFIG_DIR_NAME,
                                                 SDXL_WARMUP_WIDTH=64, SDXL_WARMUP_HEIGHT=64, SDXL_WARMUP_IMAGES=1))
    single.setup()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(sdxl.txt2img, name).state_dict(), getattr(single.txt2img, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # Bit-identical weights; kernels may still round differently on differently laid-out tensors.
    req = request(num_images=3, seeds=[1, 2, 3])
    assert all(same(a, b, tol=1) for a, b in zip(sdxl.run(req), single.run(req)))


def test_single_file_without_config_folder_names_the_setting(tiny_dir, tiny_cache):
    settings = Settings(SDXL_MODEL_PATH=str(tiny_dir / SINGLE_FILE_NAME), GENQ_TINY_CACHE=str(tiny_cache),
                        GENQ_DEVICE="cpu")
    with pytest.raises(RuntimeError, match="SDXL_CONFIG_PATH"):
        SdxlPipeline(settings, SdxlSettings(SDXL_CONFIG_PATH=None)).setup()


def test_missing_model_path_names_the_setting(tiny_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="SDXL_MODEL_PATH"):
        SdxlPipeline(Settings(SDXL_MODEL_PATH=str(tmp_path / "nope"), GENQ_DEVICE="cpu")).setup()
    with pytest.raises(RuntimeError, match="SDXL_MODEL_PATH is not set"):
        SdxlPipeline(Settings(SDXL_MODEL_PATH=None, GENQ_DEVICE="cpu")).setup()


def test_each_image_is_reproducible_from_its_own_seed(sdxl):
    batch = sdxl.run(request(num_images=3, seeds=[11, 22, 33]))
    alone = sdxl.run(request(num_images=1, seeds=[22]))
    assert len(batch) == 3 and len(alone) == 1
    assert same(batch[1], alone[0], tol=2)
    assert not same(batch[0], batch[1]) and not same(batch[1], batch[2])
    assert same(sdxl.run(request(seeds=[22]))[0], alone[0])


def test_sizes_are_honoured(sdxl):
    images = sdxl.run(request(width=64, height=96, num_images=3, seeds=[1, 2, 3]))
    assert [im.size for im in images] == [(64, 96)] * 3
    assert all(im.mode == "RGB" for im in images)
    ref = sdxl.run(img2img(width=96, height=64), reference=solid("red", (300, 200)))
    assert ref[0].size == (96, 64)


def test_prompt_negative_prompt_and_guidance_change_the_image(sdxl):
    base = sdxl.run(request())[0]
    assert not same(base, sdxl.run(request(negative_prompt="blurry, dark"))[0])
    assert not same(base, sdxl.run(request(prompt="a blue car on a road"))[0])
    assert not same(base, sdxl.run(request(guidance_scale=1.0))[0])


@pytest.mark.parametrize("scheduler", ["euler_a", "dpm++", "ddim"])
def test_scheduler_switch_changes_output_and_does_not_leak(sdxl, scheduler):
    default = sdxl.run(request())[0]
    switched = sdxl.run(request(scheduler=scheduler))[0]
    assert not same(default, switched)
    assert same(sdxl.run(request())[0], default)
    assert same(sdxl.run(request(scheduler=scheduler))[0], switched)
    assert type(sdxl.txt2img.scheduler).__name__ == "EulerDiscreteScheduler"


def test_euler_is_the_tiny_checkpoints_default(sdxl):
    assert same(sdxl.run(request(scheduler="euler"))[0], sdxl.run(request())[0])


def test_img2img_uses_the_reference(sdxl):
    red = sdxl.run(img2img(), reference=solid("red"))
    blue = sdxl.run(img2img(), reference=solid("blue"))
    assert not same(red[0], blue[0])
    assert same(sdxl.run(img2img(), reference=solid("red"))[0], red[0])
    assert not same(red[0], sdxl.run(img2img(strength=1.0), reference=solid("red"))[0])


def test_reference_is_made_upright_and_transparency_goes_on_white(sdxl):
    run = lambda ref: sdxl.run(img2img(), reference=ref)[0]  # noqa: E731
    transparent = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    assert same(run(transparent), run(Image.new("RGB", (64, 64), "white")))
    upright = Image.new("RGB", (48, 80), "navy")
    upright.paste((250, 200, 0), (0, 0, 48, 20))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # stored rotated, EXIF says "rotate back"
    exif = sideways.getexif()
    exif[0x0112] = 6  # Orientation
    stored = io.BytesIO()
    sideways.save(stored, format="PNG", exif=exif)
    assert same(run(Image.open(stored)), run(upright))


def test_img2img_batch_matches_single_seed(sdxl):
    batch = sdxl.run(img2img(num_images=3, seeds=[5, 6, 7]), reference=solid("green"))
    alone = sdxl.run(img2img(seeds=[6]), reference=solid("green"))
    assert same(batch[1], alone[0], tol=2) and not same(batch[0], batch[1])


def test_exact_copy_runs_with_an_empty_prompt(sdxl):
    out = sdxl.run(img2img(prompt="", exact_copy=True, strength=0.25), reference=solid("orange"))
    assert len(out) == 1 and out[0].size == (64, 64)


def test_on_step_reports_every_step(sdxl):
    calls = []
    sdxl.run(request(steps=3), on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    sdxl.run(img2img(steps=4, strength=0.5), reference=solid("red"), on_step=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]


def test_exception_in_on_step_propagates_at_once(sdxl):
    calls = []

    def cancel(done, total):
        calls.append(done)
        raise Cancelled(f"cancelled at {done}/{total}")

    with pytest.raises(Cancelled, match="cancelled at 1/5"):
        sdxl.run(request(steps=5), on_step=cancel)
    assert calls == [1]
    assert len(sdxl.run(request())) == 1  # the pipeline is still usable


def test_check_inputs_errors_before_any_model_work(settings):
    unloaded = SdxlPipeline(settings)
    with pytest.raises(PayloadError) as err:
        unloaded.check_inputs(img2img(), None)
    assert err.value.field == "reference"
    with pytest.raises(PayloadError) as err:
        unloaded.check_inputs(request(), solid("red"))
    assert err.value.field == "reference"
    with pytest.raises(PayloadError) as err:
        unloaded.check_inputs(img2img(steps=3, strength=0.3), solid("red"))
    assert err.value.field == "strength" and "steps" in str(err.value)
    with pytest.raises(PayloadError) as err:
        unloaded.check_inputs(img2img().model_copy(update={"seeds": [1, 2]}), solid("red"))
    assert err.value.field == "seeds"
    unloaded.check_inputs(img2img(steps=4, strength=0.25), solid("red"))
    with pytest.raises(RuntimeError, match="setup"):
        unloaded.run(request())


def test_fp16_vae_overflow_is_decoded_again_in_fp32(settings):
    half = SdxlPipeline(settings, dtype=torch.float16)
    half.setup()
    assert half.txt2img.vae.dtype == torch.float16 and not half.vae_fp32
    with torch.no_grad():  # activations far beyond fp16's 65504, harmless in fp32
        half.txt2img.vae.decoder.conv_in.weight.mul_(3e4)
    images = half.run(request())
    assert half.vae_fp32 and half.txt2img.vae.dtype == torch.float16
    assert len(images) == 1 and pixels(images[0]).std() > 0


def test_failed_warm_up_refuses_to_start(settings, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(UNet2DConditionModel, "forward", out_of_memory)
    pipe = SdxlPipeline(settings)
    with pytest.raises(RuntimeError, match="warm-up.*refusing to start"):
        pipe.setup()
    with pytest.raises(RuntimeError, match="before setup"):
        pipe.run(request())


def test_extra_warm_up_shapes_run_at_start_and_size_memory_admission(settings, monkeypatch):
    """SDXL_WARMUP_EXTRA: each shape runs through run() at start (under GENQ_COMPILE, that compiles it)."""
    monkeypatch.setenv("SDXL_WARMUP_EXTRA", "64x64x3, 72x64x1,64x64x1")
    pipe = SdxlPipeline(settings)
    assert pipe.sdxl_settings.warmup_extra == ((64, 64, 3), (72, 64, 1), (64, 64, 1))
    shape = pipe.warmup_shape()  # the largest, for admission
    assert (shape.width, shape.height, shape.num_images) == (64, 64, 3)
    ran = []
    real_run = SdxlPipeline.run

    def recording_run(self, req, *args, **kwargs):
        ran.append((req.width, req.height, req.num_images, req.reference is not None))
        return real_run(self, req, *args, **kwargs)

    monkeypatch.setattr(SdxlPipeline, "run", recording_run)
    pipe.setup()
    # the main shape (txt2img and img2img), then each extra one not already warmed
    assert ran == [(64, 64, 1, False), (64, 64, 1, True), (64, 64, 3, False), (72, 64, 1, False)]


@pytest.mark.parametrize("main_images", [None, 3])
def test_listed_warm_up_shapes_run_their_unet_batch_whole(settings, monkeypatch, main_images):
    """Under GENQ_COMPILE the UNet is chunked (pipelines/unet_batches.py); here the chunker stands in front
    of the eager forward. A listed shape's batch runs whole, an unlisted image count in one-image chunks;
    the main warm-up shape listed again (3 images) runs whole too."""
    import pipelines.sdxl as sdxl_module
    from pipelines.unet_batches import chunk_batches

    batches = []

    def chunked(pipe, opts):
        forward = pipe.unet.forward
        chunk_batches(pipe.unet, lambda sample, *a, **kw: batches.append(sample.shape[0]) or forward(sample, *a, **kw))
        return ["chunked"]

    monkeypatch.setattr(sdxl_module, "accelerate_sdxl", chunked)
    pipe = SdxlPipeline(settings, SdxlSettings(SDXL_WARMUP_EXTRA="64x64x3", SDXL_WARMUP_IMAGES=main_images))
    pipe.setup()
    batches.clear()
    pipe.run(request(num_images=3, seeds=[1, 2, 3]))
    assert batches == [6, 6]  # listed: one call a step
    batches.clear()
    pipe.run(request(num_images=6, seeds=list(range(6))))
    assert batches == [2] * 12  # not listed: six one-image chunks a step, no new graph


def test_a_failing_extra_warm_up_shape_refuses_to_start(settings, monkeypatch):
    real_run = SdxlPipeline.run

    def fails_at_three(self, req, *args, **kwargs):
        if req.num_images == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, req, *args, **kwargs)

    monkeypatch.setattr(SdxlPipeline, "run", fails_at_three)
    pipe = SdxlPipeline(settings, SdxlSettings(SDXL_WARMUP_EXTRA="64x64x3"))
    with pytest.raises(RuntimeError, match="SDXL_WARMUP_EXTRA shape 64x64x3 failed, refusing to start"):
        pipe.setup()
    assert pipe.txt2img is None and pipe.img2img is None


@pytest.mark.parametrize("value", ["1024x1024", "1024x1024x1x2", "big", "1020x1024x1", "1024x1024x2",
                                   "8192x8192x1", "32x64x1"])
def test_bad_extra_warm_up_shapes_name_the_setting(value):
    with pytest.raises(ValueError, match="SDXL_WARMUP_EXTRA"):
        SdxlSettings(SDXL_WARMUP_EXTRA=value)


def test_tiny_build_is_atomic(tmp_path):
    settings = Settings(SDXL_MODEL_PATH="tiny", GENQ_TINY_CACHE=str(tmp_path))

    def broken(path):
        (path / "half-written").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        resolve_model_path("tiny", "sdxl", settings, broken)
    assert not (tmp_path / "sdxl").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    built = resolve_model_path("tiny", "sdxl", settings, build_tiny_sdxl)
    assert (built / "model_index.json").is_file()
