"""The daemon's admission gate on a simulated card, against a real Redis: a job that does not fit
stays in its queue (so another GPU may take it) until memory is released; an impossible job fails."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import memory
from consumers.families import FAMILIES
from consumers.gpu import GpuGate, NeverFits, loading
from schemas.settings import Settings
from tests.integration import encode, load_payload

SETTINGS = Settings(SDXL_MODEL_PATH="tiny", WAN_VACE_MODEL_PATH="tiny", QWEN_INSTRUCT_MODEL_PATH="tiny",
                    GENQ_HOST="testhost")


OPEN: list[GpuGate] = []


@pytest.fixture(autouse=True)
def close_gates():
    yield
    while OPEN:  # stop their heartbeat threads, which would otherwise re-register after the next flush
        OPEN.pop().leave("test-worker")


def gate(r, family: str, capacity: int, holder: str, pipeline=None, settings=SETTINGS) -> GpuGate:
    runtime = SimpleNamespace(settings=settings, redis=r, family=FAMILIES[family], pipeline=pipeline or object())
    OPEN.append(GpuGate(runtime, memory.Admission(r, "testhost", 0, capacity, holder, family=family)))
    return OPEN[-1]


def peak(family: str, job: dict) -> int:
    return memory.job_peak_bytes(FAMILIES[family].adapt(job))


def sdxl_job(images: int) -> dict:
    return load_payload("02_sdxl_high_6_images_negative_seed.json", config__num_images=images,
                        config__resolution="1024x1024")


def wan_job() -> dict:
    return load_payload("06_wan_video_fast_t2v.json", metadata__aspect_ratio="16:9")


def test_a_job_that_does_not_fit_waits_in_its_queue_until_memory_is_released(r):
    big = sdxl_job(6)
    # room for both daemons' weights and the big image job, but only half of the video's peak beside it
    capacity = (memory.resident_bytes("sdxl", SETTINGS) + memory.resident_bytes("wan", SETTINGS)
                + peak("sdxl", big) + peak("wan", wan_job()) // 2)
    sdxl, wan = gate(r, "sdxl", capacity, "sdxl-holder"), gate(r, "wan", capacity, "wan-holder")
    r.rpush("sdxl_queue", encode(big, 0))
    assert sdxl.may_take_next()  # 6 x 1024^2 fits on the empty card
    request = FAMILIES["sdxl"].adapt(json.loads(encode(big, 0)))
    with sdxl.hold(request):
        r.rpush("wan_queue", encode(wan_job(), 1))
        assert not wan.may_take_next()  # the video would not fit beside it: it stays queued
        assert r.llen("wan_queue") == 1
    assert wan.may_take_next()  # released: now it fits


def test_a_job_no_configured_gpu_could_hold_is_rejected_at_once(r):
    small = peak("sdxl", sdxl_job(6)) // 2  # a card half the size of the job's peak
    sdxl = gate(r, "sdxl", small, "sdxl-holder")
    plan = memory.GpuPlan(memory.GpuInfo(0, "simulated small card", small), ("sdxl",))
    r.set(memory.PLAN_KEY.format(host="testhost"), json.dumps([plan.to_json()]))
    request = FAMILIES["sdxl"].adapt(sdxl_job(6))
    r.rpush("sdxl_queue", encode(sdxl_job(6), 0))
    assert sdxl.may_take_next()  # taken at once, so the caller hears back instead of waiting forever
    with pytest.raises(NeverFits):
        with sdxl.hold(request):
            pass


def test_without_a_published_plan_this_card_decides_what_never_fits(r):
    small = peak("sdxl", sdxl_job(6)) // 2
    sdxl = gate(r, "sdxl", small, "sdxl-holder")
    with pytest.raises(NeverFits, match="ask for fewer images"):
        with sdxl.hold(FAMILIES["sdxl"].adapt(sdxl_job(6))):
            pass


def test_an_idle_daemon_moves_its_weights_to_cpu_when_another_job_needs_room(r, tiny_cache):
    """The 48 GB case: a waiting job asks the idle daemon to make room; the weights go to CPU and
    come back (with the cost recorded on the job) when the idle daemon's own next job is admitted."""
    from pipelines.sdxl import SdxlPipeline

    settings = Settings(SDXL_MODEL_PATH="tiny", GENQ_TINY_CACHE=str(tiny_cache), GENQ_DEVICE="cpu",
                        GENQ_HOST="testhost")
    pipeline = SdxlPipeline(settings)
    pipeline.setup()
    weights = memory.resident_bytes("sdxl", settings)
    video = wan_job()
    capacity = weights + memory.resident_bytes("wan", SETTINGS) + peak("wan", video) - 1  # one byte short
    idle = gate(r, "sdxl", capacity, "sdxl-holder", pipeline=pipeline, settings=settings)
    wan = gate(r, "wan", capacity, "wan-holder")
    r.rpush("wan_queue", encode(video, 0))
    assert not wan.may_take_next()  # asks for room
    assert idle.may_take_next()  # the idle daemon (empty queue) answers by moving its weights out
    assert idle.on_cpu and next(pipeline.txt2img.unet.parameters()).device.type == "cpu"
    assert wan.may_take_next()
    job = SimpleNamespace(meta={}, save_meta=lambda: None)
    request = FAMILIES["sdxl"].adapt(sdxl_job(1))
    wan.reserved.clear()
    wan.admission.release(json.loads(encode(video, 0))["id"])
    with idle.hold(request, job):
        assert not idle.on_cpu
    assert job.meta["weights_reload_s"] >= 0


class GraphPools:
    """A pipeline stand-in on a CUDA device whose process keeps `pool` bytes of CUDA graph pools: what
    torch reports as reserved beyond its live tensors after empty_cache."""

    def __init__(self, monkeypatch, pool: int):
        import torch

        self.device, self.pool, self.moves = torch.device("cuda", 0), pool, []
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 7 * memory.GIB)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 7 * memory.GIB + self.pool)

    def move_to(self, device):
        self.moves.append(str(device))


def test_cuda_graph_pools_count_as_resident_and_stay_when_the_weights_move_out(r, monkeypatch):
    pools = GraphPools(monkeypatch, 3 * memory.GIB)
    idle = gate(r, "sdxl", 100 * memory.GIB, "sdxl-holder", pipeline=pools)
    holder = lambda: memory.gpu_snapshot(r, idle.admission.key)["holders"]["sdxl-holder"]  # noqa: E731
    weights = memory.resident_bytes("sdxl", SETTINGS)
    assert (holder()["resident"], holder()["offloadable"]) == (weights + 3 * memory.GIB, weights)
    idle._offload()  # the weights go to the CPU; the graph pools do not
    assert pools.moves == ["cpu"] and holder()["resident"] == memory.table()["process_overhead_bytes"] + 3 * memory.GIB
    request = FAMILIES["sdxl"].adapt(sdxl_job(1))
    with idle.hold(request):
        pools.pool = 5 * memory.GIB  # the job's new size recorded another graph
    assert pools.moves == ["cpu", "cuda:0"]
    assert (holder()["resident"], holder()["offloadable"]) == (weights + 5 * memory.GIB, weights)


class Recorder:
    """A pipeline stand-in whose setup() records what the card held while it loaded."""

    def __init__(self, r, family: str):
        self.r, self.family, self.seen = r, family, None

    def warmup_shape(self):
        return memory.shape("sdxl", width=1024, height=1024, num_images=6)

    def setup(self):
        self.seen = memory.gpu_snapshot(self.r, memory.GPU_KEY.format(host="testhost", gpu=0))


def test_loading_reserves_the_weights_and_the_warm_up_then_hands_the_warm_up_back(r):
    capacity = 48 * memory.GIB
    adm = memory.Admission(r, "testhost", 0, capacity, "sdxl-loader", family="sdxl")
    pipeline = Recorder(r, "sdxl")
    with loading(adm, pipeline, "sdxl", SETTINGS):
        pipeline.setup()
    held = pipeline.seen["holders"]["sdxl-loader"]
    assert held["jobs"] == {"warmup:sdxl-loader": memory.job_peak_bytes(pipeline.warmup_shape())}
    assert held["resident"] >= memory.resident_bytes("sdxl", SETTINGS) - memory.table()["process_overhead_bytes"]
    after = adm.snapshot()["holders"]["sdxl-loader"]
    assert after["jobs"] == {}  # the warm-up's memory is free again for jobs
    adm.leave()


def test_a_daemon_that_can_never_warm_up_on_this_card_refuses_to_start(r):
    adm = memory.Admission(r, "testhost", 0, 8 * memory.GIB, "sdxl-small", family="sdxl")
    with pytest.raises(RuntimeError, match="can never fit"):
        with loading(adm, Recorder(r, "sdxl"), "sdxl", SETTINGS):
            pass
    adm.leave()


def test_on_a_shared_48gb_card_sdxl_warms_up_at_the_largest_job_that_can_run_there(r):
    from pipelines.sdxl import SdxlPipeline

    settings = Settings(SDXL_MODEL_PATH="/models/sdxl", GENQ_HOST="testhost")
    plan = memory.GpuPlan(memory.GpuInfo(0, "simulated 48GB", 48 * memory.GIB), ("sdxl", "wan", "chat"))
    r.set(memory.PLAN_KEY.format(host="testhost"), json.dumps([plan.to_json()]))
    pipeline = SdxlPipeline(settings)
    largest = pipeline.warmup_shape()
    assert memory.job_need_bytes(largest, settings) > plan.ceiling()  # the default could never run here
    adm = memory.Admission(r, "testhost", 0, plan.gpu.usable_bytes, "sdxl-48", family="sdxl")
    with loading(adm, pipeline, "sdxl", settings):
        fitted = pipeline.warmup_shape()
    assert (fitted.width, fitted.height, fitted.num_images) == (1024, 1024, 6)
    assert memory.job_need_bytes(fitted, settings) <= plan.ceiling()
    adm.leave()
