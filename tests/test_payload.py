"""Decoding today's list elements and adapting SDXL payloads (fast unit tests, no Redis)."""
import copy
import json

import pytest

from schemas.errors import PayloadError
from schemas.payload import decode
from schemas.sdxl import adapt_sdxl
from tests.conftest import PAYLOADS

MAX = 256 * 1024


def load(name: str) -> dict:
    return json.loads((PAYLOADS / name).read_text())


def encodings(job: dict) -> list[bytes]:
    """The three encodings the contract says one list element may have."""
    text = json.dumps(job)
    return [text.encode(), json.dumps([text]).encode(), json.dumps([job]).encode()]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_all_three_encodings_decode_to_the_same_job(index):
    job = load("02_sdxl_high_6_images_negative_seed.json")
    assert decode(encodings(job)[index], MAX) == job


def test_the_stored_rest_body_decodes():
    raw = (PAYLOADS / "01_sdxl_fast_1_image.as_stored_by_rest_rpush.txt").read_bytes()
    assert decode(raw, MAX) == load("01_sdxl_fast_1_image.json")


@pytest.mark.parametrize("raw,needle", [
    (b"not json", "not JSON"), (b"[]", "exactly one"), (b'["{broken"]', "string element"),
    (b"42", "JSON object"), (b"x" * (MAX + 1), "more than"),
])
def test_undecodable_payloads_are_named(raw, needle):
    with pytest.raises(PayloadError, match=needle):
        decode(raw, MAX)


def test_fast_preset_fills_only_absent_fields():
    job = load("01_sdxl_fast_1_image.json")
    del job["config"]["num_inference_steps"], job["config"]["guidance_scale"]
    req = adapt_sdxl(job)
    assert (req.steps, req.guidance_scale) == (15, 6.0)
    job["config"]["num_inference_steps"] = 9
    assert adapt_sdxl(job).steps == 9


def test_high_preset_and_seeds_per_image():
    job = load("02_sdxl_high_6_images_negative_seed.json")
    req = adapt_sdxl(job)
    assert (req.width, req.height, req.steps, req.guidance_scale) == (1024, 576, 30, 7.5)
    assert req.seeds == [123456789 + i for i in range(6)]
    assert req.negative_prompt.endswith("watermark, signature")
    del job["config"]["num_inference_steps"], job["config"]["guidance_scale"]
    assert (adapt_sdxl(job).steps, adapt_sdxl(job).guidance_scale) == (25, 7.5)


def test_random_seed_is_recorded_when_absent():
    req = adapt_sdxl(load("01_sdxl_fast_1_image.json"))
    assert len(req.seeds) == 1 and req.seeds[0] > 0


def test_metadata_seed_is_the_fallback():
    job = load("01_sdxl_fast_1_image.json")
    job["metadata"]["seed"] = 77
    job["config"]["num_images"] = 3
    assert adapt_sdxl(job).seeds == [77, 78, 79]


def test_unknown_keys_are_tolerated():
    job = load("01_sdxl_fast_1_image.json")
    job["something_new"] = {"x": 1}
    job["config"]["future_knob"] = True
    assert adapt_sdxl(job).job_id == job["id"]


@pytest.mark.parametrize("path,value,field", [
    (("config", "num_images"), 4, "config.num_images"),
    (("config", "num_images"), "6", "config.num_images"),
    (("config", "num_inference_steps"), 0, "config.num_inference_steps"),
    (("config", "num_inference_steps"), 10_000, "config.num_inference_steps"),
    (("config", "num_inference_steps"), 12.5, "config.num_inference_steps"),
    (("config", "guidance_scale"), "high", "config.guidance_scale"),
    (("config", "resolution"), "1024", "config.resolution"),
    (("config", "resolution"), "1000x1001", "config.resolution"),
    (("config", "resolution"), "4096x4096", "config.resolution"),
    (("config", "seed"), -5, "config.seed"),
    (("config", "pipeline"), "inpaint", "config.pipeline"),
    (("config", "pipeline"), "img2img", "metadata.reference_image_url"),
    (("metadata", "exact_copy_mode"), "yes", "metadata.exact_copy_mode"),
    (("config", "denoise_strength"), 1.5, "config.denoise_strength"),
    (("type",), "video_fast", "type"),
    (("user_id",), "../../etc", "user_id"),
    (("user_id",), 12, "user_id"),
    (("prompt",), "x" * 5000, "prompt"),
    (("compel_enabled",), True, "compel_enabled"),
])
def test_bad_fields_are_rejected_naming_the_field(path, value, field):
    job = load("01_sdxl_fast_1_image.json")
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if field == "config.denoise_strength":
        job["metadata"]["reference_image_url"] = "user-library/u/ref.png"
    with pytest.raises(PayloadError) as info:
        adapt_sdxl(job)
    assert str(info.value).startswith(field), str(info.value)


def test_reference_makes_img2img_with_strength_fallbacks():
    job = load("01_sdxl_fast_1_image.json")
    job["config"]["pipeline"] = "img2img"
    job["metadata"]["reference_image_url"] = "user-library/u/ref.png"
    req = adapt_sdxl(job)
    assert req.mode == "img2img" and req.reference.source == "user-library/u/ref.png"
    assert req.strength == pytest.approx(0.2)
    del job["config"]["denoise_strength"]
    job["metadata"]["reference_strength"] = 0.3
    assert adapt_sdxl(job).strength == pytest.approx(0.7)


def test_exact_copy_allows_an_empty_prompt_only_with_a_reference():
    job = load("01_sdxl_fast_1_image.json")
    job["prompt"] = ""
    with pytest.raises(PayloadError, match="prompt"):
        adapt_sdxl(job)
    job["metadata"].update(exact_copy_mode=True, reference_image_url="user-library/u/ref.png")
    req = adapt_sdxl(job)
    assert req.exact_copy and req.prompt == ""


def test_bounds_come_from_the_environment(monkeypatch):
    """GENQ_LIMIT_* is read at import: a fresh interpreter sees a tighter bound."""
    import subprocess
    import sys
    code = ("import json,sys; from schemas.sdxl import adapt_sdxl; j=json.load(open(sys.argv[1]));"
            "j['config']['num_inference_steps']=30\n"
            "try: adapt_sdxl(j); print('ok')\nexcept ValueError as e: print(e)")
    env = dict(__import__("os").environ, GENQ_LIMIT_SDXL_MAX_STEPS="20")
    out = subprocess.run([sys.executable, "-c", code, str(PAYLOADS / "01_sdxl_fast_1_image.json")],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("config.num_inference_steps") and "20" in out
