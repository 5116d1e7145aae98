"""adapt_wan on today's payloads (06, 07) and variations; WanRequest's own bounds."""
from __future__ import annotations

import copy
import json

import pytest

from schemas.errors import PayloadError
from schemas.limits import LIMITS
from schemas.wan import WanRequest, adapt_wan, frames_for_duration, size_for_aspect

from .conftest import PAYLOADS


def load(name: str) -> dict:
    return json.loads((PAYLOADS / name).read_text())


@pytest.fixture
def t2v() -> dict:
    return load("06_wan_video_fast_t2v.json")


@pytest.fixture
def both() -> dict:
    return load("07_wan_video_high_start_end_refs.json")


def rejected(job: dict) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        adapt_wan(job)
    return info.value


def test_payload_06_text_to_video(t2v):
    req = adapt_wan(t2v)
    assert (req.job_id, req.user_id, req.job_type) == (t2v["id"], t2v["user_id"], "video_fast")
    assert req.prompt == t2v["prompt"] and req.negative_prompt == t2v["negative_prompt"]
    # the caller's own steps and guidance win over the preset; 1:1 -> the square size, not 1024x1024
    assert (req.steps, req.guidance_scale, req.sampler, req.shift) == (25, 6.0, "dpm++", 3.0)
    assert (req.width, req.height, req.num_frames, req.fps) == (624, 624, 81, 16)
    assert req.reference_mode == "none" and req.references == {}
    assert 0 < req.seed < 2**31 and req.fast_mode is False


def test_payload_07_first_and_last_frame(both):
    req = adapt_wan(both)
    assert req.reference_mode == "both"
    assert req.references["first_frame"].source == both["config"]["first_frame"]
    assert req.references["last_frame"].source == both["config"]["last_frame"]
    assert set(req.references) == {"first_frame", "last_frame"}
    assert req.job_type == "video_high" and req.steps == 25


def test_random_seed_is_recorded_and_given_seed_kept(t2v):
    assert adapt_wan(t2v).seed != 0
    t2v["config"]["seed"] = 42
    assert adapt_wan(t2v).seed == 42
    del t2v["config"]["seed"]
    t2v["metadata"]["seed"] = 7
    assert adapt_wan(t2v).seed == 7


def test_presets_fill_only_absent_fields(t2v):
    for key in ("num_inference_steps", "guidance_scale", "sample_solver"):
        del t2v["config"][key]
    t2v["type"] = "video_high"
    req = adapt_wan(t2v)
    assert (req.steps, req.guidance_scale, req.sampler) == (50, 7.5, "unipc")


@pytest.mark.parametrize("aspect,size", [("16:9", (832, 480)), ("9:16", (480, 832)), ("1:1", (624, 624)),
                                         ("4:3", (736, 544)), ("3:4", (544, 736))])
def test_size_from_aspect_ratio(t2v, aspect, size):
    t2v["metadata"]["aspect_ratio"] = aspect
    req = adapt_wan(t2v)
    assert (req.width, req.height) == size
    assert req.width % 16 == 0 and req.height % 16 == 0


def test_resolution_gives_only_the_shape_when_aspect_is_absent(t2v):
    del t2v["metadata"]["aspect_ratio"]
    t2v["config"]["resolution"] = "576x1024"
    assert (adapt_wan(t2v).width, adapt_wan(t2v).height) == (480, 832)


@pytest.mark.parametrize("aspect", ["wide", "16/9", "0:1", "10:1"])
def test_bad_aspect_ratio_is_named(t2v, aspect):
    t2v["metadata"]["aspect_ratio"] = aspect
    assert rejected(t2v).field == "metadata.aspect_ratio"


@pytest.mark.parametrize("seconds,frames", [(5, 81), (2, 33), (1, 17), (0.3, 5), (10, 161), (4.9, 77)])
def test_frames_from_duration(t2v, seconds, frames):
    t2v["metadata"]["duration"] = seconds
    req = adapt_wan(t2v)
    assert req.num_frames == frames == frames_for_duration(seconds)
    assert (req.num_frames - 1) % 4 == 0


@pytest.mark.parametrize("seconds", [11, 60, 0, -1, 0.05])
def test_duration_out_of_bounds_names_metadata_duration(t2v, seconds):
    t2v["metadata"]["duration"] = seconds
    err = rejected(t2v)
    assert err.field == "metadata.duration"
    assert str(LIMITS.wan_max_frames) in err.message or "s" in err.message


def test_absent_duration_gives_81_frames(t2v):
    del t2v["metadata"]["duration"]
    assert adapt_wan(t2v).num_frames == 81


@pytest.mark.parametrize("job_type", ["image_fast", "image_high"])
def test_image_job_types_make_one_frame(t2v, job_type):
    t2v["type"] = job_type
    del t2v["config"]["num_inference_steps"]
    req = adapt_wan(t2v)
    assert req.num_frames == 1 and req.is_image
    assert req.steps == {"image_fast": 25, "image_high": 50}[job_type]


def test_image_job_types_refuse_frame_modes(both):
    both["type"] = "image_fast"
    err = rejected(both)
    assert err.field == "metadata.video_reference_mode"


@pytest.mark.parametrize("mode,config_key,fallback", [
    ("start", "first_frame", "start_reference_url"),
    ("end", "last_frame", "end_reference_url"),
])
def test_frame_modes_take_config_then_metadata(both, mode, config_key, fallback):
    both["metadata"]["video_reference_mode"] = mode
    req = adapt_wan(both)
    assert set(req.references) == {config_key}
    del both["config"][config_key]
    assert adapt_wan(both).references[config_key].source == both["metadata"][fallback]
    both["metadata"][fallback] = None
    err = rejected(both)
    assert err.field == f"config.{config_key}" and mode in err.message


def test_single_mode_takes_config_image(t2v):
    t2v["metadata"]["video_reference_mode"] = "single"
    assert rejected(t2v).field == "config.image"
    t2v["config"]["image"] = "user-library/u/ref.png"
    req = adapt_wan(t2v)
    assert req.references["image"].source == "user-library/u/ref.png"


def test_mode_none_ignores_reference_fields(both):
    both["metadata"]["video_reference_mode"] = "none"
    req = adapt_wan(both)
    assert req.references == {} and req.first_frame is None and req.last_frame is None


def test_unknown_keys_are_tolerated(t2v):
    t2v["brand_new"] = {"x": 1}
    t2v["config"]["something"] = [1, 2]
    t2v["metadata"]["camera_angle"] = 3
    assert adapt_wan(t2v).job_type == "video_fast"


@pytest.mark.parametrize("path,value,field", [
    ("config.num_inference_steps", "25", "config.num_inference_steps"),
    ("config.num_inference_steps", 0, "config.num_inference_steps"),
    ("config.num_inference_steps", LIMITS.wan_max_steps + 1, "config.num_inference_steps"),
    ("config.guidance_scale", True, "config.guidance_scale"),
    ("config.guidance_scale", LIMITS.wan_max_guidance + 1, "config.guidance_scale"),
    ("config.sample_solver", "ddim", "config.sample_solver"),
    ("config.sample_solver", 3, "config.sample_solver"),
    ("config.seed", -5, "config.seed"),
    ("config.seed", 1.5, "config.seed"),
    ("config.num_images", 3, "config.num_images"),
    ("config.pipeline", "txt2img", "config.pipeline"),
    ("config.first_frame", 12, "config.first_frame"),
    ("metadata.duration", "5s", "metadata.duration"),
    ("metadata.video_reference_mode", "middle", "metadata.video_reference_mode"),
    ("metadata.aspect_ratio", 1.77, "metadata.aspect_ratio"),
    ("type", "video_ultra", "type"),
    ("prompt", "   ", "prompt"),
])
def test_wrong_types_and_ranges_name_the_payload_field(both, path, value, field):
    node = both
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    err = rejected(both)
    assert err.field.startswith(field)


def test_request_bounds_hold_without_the_adapter(t2v):
    good = adapt_wan(t2v).model_dump()
    for change in ({"width": 620}, {"num_frames": 80}, {"num_frames": 1}, {"fps": 24},
                   {"reference_mode": "start"}, {"job_type": "image_fast"},
                   {"width": 1600, "height": 1600}, {"shift": 0}):
        with pytest.raises(ValueError):
            WanRequest(**{**copy.deepcopy(good), **change})


def test_native_sizes_stay_within_the_pixel_limit():
    for ratio in ((16, 9), (9, 16), (1, 1), (4, 3), (21, 9)):
        w, h = size_for_aspect(ratio)
        assert w * h <= LIMITS.wan_max_pixels
