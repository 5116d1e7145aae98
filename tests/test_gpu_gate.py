"""The daemon's admission gate on a simulated card, against a real Redis: a job that does not fit
stays in its queue (so another GPU may take it) until memory is released; an impossible job fails."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import memory
from consumers.families import FAMILIES
from consumers.gpu import GpuGate, NeverFits
from schemas.settings import Settings
from tests.integration import encode, load_payload

GIB = 1024**3


def gate(r, family: str, capacity_gib: float, holder: str) -> GpuGate:
    settings = Settings(SDXL_MODEL_PATH="tiny", WAN_VACE_MODEL_PATH="tiny", QWEN_INSTRUCT_MODEL_PATH="tiny",
                        GENQ_HOST="testhost")
    runtime = SimpleNamespace(settings=settings, redis=r, family=FAMILIES[family], pipeline=object())
    admission = memory.Admission(r, "testhost", 0, int(capacity_gib * GIB), holder, family=family)
    return GpuGate(runtime, admission)


def sdxl_job(images: int) -> dict:
    return load_payload("02_sdxl_high_6_images_negative_seed.json", config__num_images=images,
                        config__resolution="1024x1024")


def wan_job() -> dict:
    return load_payload("06_wan_video_fast_t2v.json", metadata__aspect_ratio="16:9")


def test_a_job_that_does_not_fit_waits_in_its_queue_until_memory_is_released(r):
    sdxl, wan = gate(r, "sdxl", 40, "sdxl-holder"), gate(r, "wan", 40, "wan-holder")
    big = sdxl_job(6)
    r.rpush("sdxl_queue", encode(big, 0))
    assert sdxl.may_take_next()  # 6 x 1024^2 fits on an empty 40 GB card
    request = FAMILIES["sdxl"].adapt(json.loads(encode(big, 0)))
    with sdxl.hold(request):
        r.rpush("wan_queue", encode(wan_job(), 1))
        assert not wan.may_take_next()  # the video would not fit beside it: it stays queued
        assert r.llen("wan_queue") == 1
    assert wan.may_take_next()  # released: now it fits


def test_a_job_no_configured_gpu_could_hold_is_rejected_at_once(r):
    sdxl = gate(r, "sdxl", 24, "sdxl-holder")
    plan = memory.GpuPlan(memory.GpuInfo(0, "simulated 24GB", 24 * GIB), ("sdxl",))
    r.set(memory.PLAN_KEY.format(host="testhost"), json.dumps([plan.to_json()]))
    request = FAMILIES["sdxl"].adapt(sdxl_job(6))
    r.rpush("sdxl_queue", encode(sdxl_job(6), 0))
    assert sdxl.may_take_next()  # taken at once, so the caller hears back instead of waiting forever
    with pytest.raises(NeverFits):
        with sdxl.hold(request):
            pass
