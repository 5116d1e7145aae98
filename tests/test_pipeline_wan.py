"""WanVideoPipeline on tiny random-weight WAN 2.1 T2V and VACE checkpoints, on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.wan import WanConfigError, WanSettings, WanVideoPipeline, conditioning_video
from schemas.errors import PayloadError
from schemas.settings import Settings
from schemas.wan import WanRequest

pytestmark = pytest.mark.timeout(300)

ALL_MODES = ("none", "single", "start", "end", "both")


def settings(tiny_cache, **paths) -> Settings:
    return Settings(device="cpu", tiny_cache_dir=tiny_cache, **paths)


def loaded(tiny_cache, modes=ALL_MODES, **paths) -> WanVideoPipeline:
    pipe = WanVideoPipeline(settings(tiny_cache, **paths), WanSettings(modes_served=modes))
    pipe.setup()
    return pipe


@pytest.fixture(scope="module")
def both(tiny_cache) -> WanVideoPipeline:
    """T2V for `none`, VACE for the reference modes: the production layout."""
    return loaded(tiny_cache, wan_model_path="tiny", wan_vace_model_path="tiny")


@pytest.fixture(scope="module")
def vace(tiny_cache) -> WanVideoPipeline:
    """VACE alone: `none` and the reference modes run on the same transformer, so outputs compare."""
    return loaded(tiny_cache, wan_vace_model_path="tiny")


def request(**changes) -> WanRequest:
    fields = dict(job_id="job-1", user_id="user-1", job_type="video_fast", prompt="a red fox in the snow",
                  negative_prompt="blurry", width=32, height=32, num_frames=5, steps=2, guidance_scale=5.0,
                  sampler="dpm++", shift=3.0, seed=1)
    fields.update(changes)
    return WanRequest(**fields)


def picture(color, size=(40, 24)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 2))
    return image


REFS = {"image": picture((200, 30, 30)), "first_frame": picture((30, 200, 30)),
        "last_frame": picture((30, 30, 200))}
REF_FIELDS = {"single": {"reference_image": {"source": "u/a.png"}},
              "start": {"first_frame": {"source": "u/f.png"}},
              "end": {"last_frame": {"source": "u/l.png"}},
              "both": {"first_frame": {"source": "u/f.png"}, "last_frame": {"source": "u/l.png"}},
              "none": {}}


def with_mode(mode: str, **changes) -> WanRequest:
    return request(reference_mode=mode, **REF_FIELDS[mode], **changes)


def pixels(frames) -> np.ndarray:
    return np.stack([np.asarray(f, dtype=np.int16) for f in frames])


def test_text_to_video_has_the_requested_frames_and_size(both):
    frames = both.run(request(width=48, height=32, num_frames=9))
    assert len(frames) == 9
    assert all(f.size == (48, 32) and f.mode == "RGB" for f in frames)


def test_image_job_type_makes_one_frame(both):
    frames = both.run(request(job_type="image_fast", num_frames=1))
    assert len(frames) == 1 and frames[0].size == (32, 32)


def test_same_seed_same_video_other_seed_other_video(both):
    first, again, other = (pixels(both.run(request(seed=s))) for s in (7, 7, 8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("sampler", ["dpm++", "unipc", "euler"])
def test_every_sampler_runs_and_matters(both, sampler):
    out = pixels(both.run(request(sampler=sampler, steps=3)))
    if sampler != "dpm++":
        assert not np.array_equal(out, pixels(both.run(request(sampler="dpm++", steps=3))))


def test_shift_changes_the_schedule(both):
    assert not np.array_equal(pixels(both.run(request(shift=3.0))), pixels(both.run(request(shift=8.0))))


@pytest.fixture(scope="module")
def vace_video(vace):
    """One VACE run per mode with REFS, shared by the tests that compare against it."""
    cache: dict[str, list[Image.Image]] = {}

    def video(mode: str) -> list[Image.Image]:
        if mode not in cache:
            cache[mode] = vace.run(with_mode(mode), REFS)
        return cache[mode]

    return video


@pytest.mark.parametrize("mode", ["single", "start", "end", "both"])
def test_reference_mode_conditions_the_video(vace_video, mode):
    conditioned = vace_video(mode)
    assert len(conditioned) == 5 and conditioned[0].size == (32, 32)
    assert not np.array_equal(pixels(conditioned), pixels(vace_video("none")))


def test_both_differs_from_either_end_alone(vace_video):
    for alone in ("start", "end"):
        assert not np.array_equal(pixels(vace_video("both")), pixels(vace_video(alone)))


@pytest.mark.parametrize("mode,slot", [("single", "image"), ("start", "first_frame"), ("end", "last_frame")])
def test_the_reference_picture_itself_matters(vace, vace_video, mode, slot):
    swapped = dict(REFS, **{slot: picture((10, 10, 10), size=(24, 40))})
    assert not np.array_equal(pixels(vace_video(mode)), pixels(vace.run(with_mode(mode), swapped)))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_runs_in_the_production_layout(both, mode):
    assert len(both.run(with_mode(mode), REFS)) == 5


def test_single_reference_works_for_an_image_job(both):
    frames = both.run(with_mode("single", job_type="image_high", num_frames=1), REFS)
    assert len(frames) == 1


def test_none_ignores_reference_images(both):
    assert np.array_equal(pixels(both.run(request())), pixels(both.run(request(), REFS)))


def test_frame_modes_pin_the_right_frames():
    video, mask = conditioning_video("both", REFS, 32, 16, 9)
    assert len(video) == len(mask) == 9
    assert [m.getpixel((0, 0)) for m in mask] == [0] + [255] * 7 + [0]
    assert video[0].size == (32, 16) and video[0].getpixel((31, 15)) == (30, 200, 30)
    assert video[-1].getpixel((31, 15)) == (30, 30, 200)
    _, end_mask = conditioning_video("end", REFS, 32, 16, 5)
    assert [m.getpixel((0, 0)) for m in end_mask] == [255] * 4 + [0]


def test_on_step_is_called_once_per_step(both):
    calls = []
    both.run(request(steps=3), on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_on_step_exceptions_propagate(vace):
    class Cancelled(Exception):
        pass

    def cancel(i, n):
        raise Cancelled(i)

    with pytest.raises(Cancelled):
        vace.run(with_mode("start"), REFS, on_step=cancel)


def test_inputs_it_cannot_honour_are_refused(both):
    # (fast mode, and WAN_FAST_MODE_ALLOWED=false refusing it: tests/test_wan_fast_mode.py)
    with pytest.raises(PayloadError) as err:
        both.run(request(prompt="word " * 300))
    assert err.value.field == "prompt"
    with pytest.raises(ValueError, match="first_frame"):
        both.run(with_mode("start"), {})


def test_t2v_only_refuses_reference_modes_at_setup(tiny_cache):
    pipe = WanVideoPipeline(settings(tiny_cache, wan_model_path="tiny"), WanSettings(modes_served=ALL_MODES))
    with pytest.raises(WanConfigError, match="WAN_VACE_MODEL_PATH"):
        pipe.setup()


def test_t2v_only_serving_none_refuses_reference_jobs(tiny_cache):
    pipe = loaded(tiny_cache, modes=("none",), wan_model_path="tiny")
    assert len(pipe.run(request())) == 5
    with pytest.raises(PayloadError) as err:
        pipe.run(with_mode("start"), REFS)
    assert err.value.field == "metadata.video_reference_mode"


def test_no_checkpoint_at_all_is_refused(tiny_cache):
    with pytest.raises(WanConfigError, match="WAN_MODEL_PATH"):
        WanVideoPipeline(settings(tiny_cache), WanSettings(modes_served=("none",))).setup()


def test_swapped_checkpoints_are_refused(both, tiny_cache):
    t2v_folder = tiny_cache / "wan"
    vace_folder = tiny_cache / "wan_vace"
    with pytest.raises(WanConfigError, match="expected WanVACETransformer3DModel"):
        WanVideoPipeline(settings(tiny_cache, wan_vace_model_path=str(t2v_folder))).setup()
    with pytest.raises(WanConfigError, match="expected WanTransformer3DModel"):
        WanVideoPipeline(settings(tiny_cache, wan_model_path=str(vace_folder)),
                         WanSettings(modes_served=("none",))).setup()


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("WAN_MODES_SERVED", "none, start,none")
    monkeypatch.setenv("WAN_TEXT_ENCODER_OFFLOAD", "false")
    wan = WanSettings()
    assert wan.modes_served == ("none", "start") and wan.text_encoder_offload is False
    monkeypatch.setenv("WAN_MODES_SERVED", "none,middle")
    with pytest.raises(ValueError):
        WanSettings()
    monkeypatch.delenv("WAN_MODES_SERVED")
    assert WanSettings().modes_served == ALL_MODES
