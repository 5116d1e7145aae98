"""memory.py: the VRAM numbers, simulated probing, and admission between real processes on a real Redis."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

import memory
from memory import GIB, Admission, GpuInfo, GpuPlan, OomPolicy
from schemas.sdxl import adapt_sdxl
from schemas.settings import Settings
from schemas.wan import adapt_wan
from tests.conftest import PAYLOADS, ROOT

REAL = dict(SDXL_MODEL_PATH="/models/sdxl", WAN_MODEL_PATH="/models/wan", QWEN_INSTRUCT_MODEL_PATH="/models/qwen")


def payload(name: str) -> dict:
    return json.loads((PAYLOADS / name).read_text())


def until(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll an observable condition (Redis state) with a bound; returns its first truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- numbers ----------------------------------------------------------------------------------------
def test_simulated_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("GENQ_SIMULATED_GPUS", "80GB, 48GB")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [(g.index, g.total_bytes) for g in memory.get_probe().gpus()] == [(0, 80 * GIB), (1, 48 * GIB)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [(g.index, g.total_bytes) for g in memory.get_probe().gpus()] == [(1, 48 * GIB)]
    with pytest.raises(ValueError, match="not a memory size"):
        memory.parse_size("lots")


def test_job_peak_follows_shape_not_steps():
    sdxl6 = adapt_sdxl(payload("02_sdxl_high_6_images_negative_seed.json"))
    fewer_steps = sdxl6.model_copy(update={"steps": 2})
    one_image = sdxl6.model_copy(update={"num_images": 1, "seeds": sdxl6.seeds[:1]})
    assert memory.job_peak_bytes(fewer_steps) == memory.job_peak_bytes(sdxl6)
    assert memory.job_peak_bytes(one_image) < memory.job_peak_bytes(sdxl6)

    video = adapt_wan(payload("06_wan_video_fast_t2v.json"))
    longer = video.model_copy(update={"num_frames": 161})
    assert memory.job_peak_bytes(video) < memory.job_peak_bytes(longer)
    # fast mode also keeps the step cache's hidden states: ~0.6 GB more at 832x480x81
    fast = video.model_copy(update={"fast_mode": True})
    extra = memory.job_peak_bytes(fast) - memory.job_peak_bytes(video)
    units = video.width * video.height * video.num_frames
    assert extra == pytest.approx(memory.WAN_STEP_CACHE_BYTES_PER_UNIT * units * memory.table()["safety_factor"], abs=2)
    assert 0.4 * GIB < extra < 1.0 * GIB

    short = memory.shape("chat", messages=[], max_new_tokens=200)
    long = memory.shape("chat", messages=[memory.shape("m", content="x" * 20000)], max_new_tokens=200)
    assert 0 < memory.job_peak_bytes(short) < memory.job_peak_bytes(long)


def test_table_points_are_reproduced():
    t = memory.table()
    for family, spec in t["jobs"].items():
        for p in spec["points"]:
            got = memory._interpolate([(q["units"], q["peak_bytes"] - q["resident_bytes"]) for q in spec["points"]],
                                      p["units"])
            assert got == pytest.approx(p["peak_bytes"] - p["resident_bytes"]), family


def test_resident_counts_configured_parts_and_tiny_models():
    real = Settings(**REAL, QWEN_BASE_MODEL_PATH="/models/qwen-base")
    tiny = Settings(SDXL_MODEL_PATH="tiny", QWEN_INSTRUCT_MODEL_PATH="tiny")
    t = memory.table()
    assert set(memory.resident_parts("chat", real)) == {"qwen_instruct", "qwen_base", "chat.kv_pool"}
    assert memory.resident_parts("chat", real)["chat.kv_pool"] == 65536 * 57344  # the engine's KV pool, 3.5 GiB
    assert "chat.kv_pool" not in memory.resident_parts("chat", tiny)
    assert memory.resident_parts("wan", real)["wan.text_encoder"] == t["parts"]["wan.text_encoder"]["bytes"]
    assert memory.resident_bytes("sdxl", tiny) == t["process_overhead_bytes"] + 3 * t["tiny_part_bytes"]
    assert memory.resident_parts("wan", tiny) == {}


def test_the_chat_kv_pool_follows_the_engine_settings():
    assert memory.chat_kv_pool_bytes({"GENQ_CHAT_CACHE_TOKENS": "32768"}) == 32768 * 57344
    assert memory.chat_kv_pool_bytes({"GENQ_CHAT_BATCH": "0"}) == 0


def test_oom_policy_and_detection():
    class OutOfMemoryError(RuntimeError):  # the name torch.cuda uses
        pass

    policy = OomPolicy(max_consecutive=3)
    assert memory.is_oom(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not memory.is_oom(ValueError("bad prompt"))
    assert [policy.record(OutOfMemoryError()), policy.record(None), policy.record(OutOfMemoryError()),
            policy.record(OutOfMemoryError()), policy.record(OutOfMemoryError())] == [False, False, False, False, True]


def test_a_job_no_configured_gpu_can_hold_is_rejected_with_a_reason(r):
    settings = Settings(**REAL)
    plan = [GpuPlan(GpuInfo(0, "L40S", 48 * GIB), ("sdxl", "wan", "chat")), GpuPlan(GpuInfo(1, "X", 80 * GIB), ("chat",))]
    r.set(memory.PLAN_KEY.format(host="h1"), json.dumps([p.to_json() for p in plan]))
    fleet = memory.load_fleet(r, "sdxl")
    assert [p.gpu.index for p in fleet] == [0]
    huge = memory.largest_allowed_job("sdxl")
    message = memory.never_fits_message(huge, settings, fleet)
    assert "1536x1536 x6" in message and "largest GPU serving sdxl" in message
    assert memory.never_fits_message(memory.shape("sdxl", width=1024, height=1024, num_images=6), settings, fleet) is None
    assert memory.never_fits_message(huge, settings, []) is None  # no plan known: cannot judge


# --- admission ----------------------------------------------------------------------------------------
def adm(r, name: str, cap_gib: float = 48, **kw) -> Admission:
    return Admission(r, "testhost", 0, int(cap_gib * GIB), name, **kw)


def test_a_job_that_does_not_fit_waits_until_another_finishes(r):
    a, b = adm(r, "sdxl-gpu0-a", cap_gib=20), adm(r, "wan-gpu0-b", cap_gib=20)
    a.set_resident(4 * GIB)
    b.set_resident(4 * GIB)
    assert a.try_reserve("job-a", 10 * GIB)
    waiting = b.try_reserve("job-b", 10 * GIB)
    assert not waiting and not waiting.impossible and waiting.shortfall == 0  # room comes back when job-a ends
    a.release("job-a")
    assert b.try_reserve("job-b", 10 * GIB)
    snap = a.snapshot()
    assert snap["reserved"] == 10 * GIB and snap["holders"]["wan-gpu0-b"]["jobs"] == {"job-b": 10 * GIB}


def test_a_waiting_big_job_is_not_overtaken_by_small_ones(r):
    big, small = adm(r, "sdxl-gpu0-big", starve_after_s=0), adm(r, "chat-gpu0-small", starve_after_s=0)
    runner = adm(r, "wan-gpu0-run", starve_after_s=0)
    assert runner.try_reserve("long-video", 30 * GIB)
    assert not big.try_reserve("six-images", 30 * GIB)
    refused = small.try_reserve("chat-1", 1 * GIB)  # would fit, but the big job waits longer
    assert not refused and refused.blocked_by == "sdxl-gpu0-big"
    runner.release("long-video")
    assert not small.try_reserve("chat-1", 1 * GIB)
    assert big.try_reserve("six-images", 30 * GIB)
    assert small.try_reserve("chat-1", 1 * GIB)


def test_small_jobs_may_backfill_while_the_big_waiter_is_young(r):
    big, small = adm(r, "sdxl-gpu0-big", starve_after_s=3600), adm(r, "chat-gpu0-small", starve_after_s=3600)
    assert adm(r, "wan-gpu0-run").try_reserve("long-video", 30 * GIB)
    assert not big.try_reserve("six-images", 30 * GIB)
    assert small.try_reserve("chat-1", 1 * GIB)


def test_idle_models_are_asked_to_move_to_cpu_on_a_48gb_card(r, monkeypatch):
    # The weights' protocol alone: without the chat KV pool, the card has room for the video once
    # the big job ends whichever daemon was asked to move (which one depends on Redis time).
    monkeypatch.setenv("GENQ_CHAT_BATCH", "0")
    settings = Settings(**REAL)
    names = {f: adm(r, f"{f}-gpu0-x", starve_after_s=0) for f in memory.FAMILIES}
    overhead = memory.table()["process_overhead_bytes"]
    for family, a in names.items():
        a.set_resident(memory.resident_bytes(family, settings), memory.resident_bytes(family, settings) - overhead)
    six = memory.job_peak_bytes(memory.shape("sdxl", width=1024, height=1024, num_images=6))
    first = names["sdxl"].try_reserve("six-images", six)
    assert not first and first.shortfall > 0
    asked = {f: a.should_offload() for f, a in names.items()}
    assert asked["sdxl"] == 0 and sum(asked.values()) == first.shortfall
    for family in ("wan", "chat"):  # the daemons move what they were asked for, then say so
        if asked[family]:
            left = memory.resident_bytes(family, settings) - asked[family]
            names[family].set_resident(left, left - overhead)
    assert names["sdxl"].try_reserve("six-images", six)
    assert all(a.should_offload() == 0 for a in names.values())
    # moving weights back is a reservation like any other: it waits until the big job ends
    wan_parts = sum(memory.resident_parts("wan", settings).values())
    wan_back = wan_parts - names["wan"].snapshot()["holders"]["wan-gpu0-x"]["offloadable"]
    video = memory.job_peak_bytes(memory.shape("wan", width=832, height=480, num_frames=81))
    assert not names["wan"].try_reserve("video", video, load_bytes=wan_back)
    names["sdxl"].release("six-images")
    assert names["wan"].try_reserve("video", video, load_bytes=wan_back)
    assert names["wan"].snapshot()["holders"]["wan-gpu0-x"]["resident"] == memory.resident_bytes("wan", settings)


def test_a_job_larger_than_the_card_is_impossible_not_waiting(r):
    a, b = adm(r, "sdxl-gpu0-a"), adm(r, "chat-gpu0-b")
    a.set_resident(8 * GIB, 7 * GIB)
    b.set_resident(16 * GIB, 15 * GIB)
    verdict = a.try_reserve("huge", 40 * GIB)  # 8 own + 40 + 1 pinned by b > 48
    assert verdict.impossible and b.should_offload() == 0
    assert "sdxl-gpu0-a" not in [n for n, h in a.snapshot()["holders"].items() if h.get("wait")]


HOLDER = """
import sys, time, redis, memory
r = redis.Redis.from_url(sys.argv[1])
a = memory.Admission(r, "testhost", 0, 10 * memory.GIB, "sdxl-gpu0-doomed", ttl_s=1)
a.set_resident(2 * memory.GIB)
assert a.try_reserve("job-in-flight", 8 * memory.GIB)
a.start_heartbeat(0.2)
print("reserved", flush=True)
time.sleep(600)
"""


def test_a_dead_process_reservation_expires(r, redis_server):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, redis_server.url], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "reserved"
        other = adm(r, "chat-gpu0-alive", cap_gib=10)
        assert not other.try_reserve("next", 4 * GIB)
        # its heartbeat keeps it alive past its TTL
        first_exp = other.snapshot()["holders"]["sdxl-gpu0-doomed"]["exp"]
        until(lambda: other.snapshot()["now_ms"] > first_exp + 500 and "sdxl-gpu0-doomed" in other.snapshot()["holders"],
              what="the holder to outlive its first TTL")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert until(lambda: other.try_reserve("next", 4 * GIB), what="the dead holder's reservation to expire")
        assert "sdxl-gpu0-doomed" not in other.snapshot()["holders"]
    finally:
        holder.kill()
        holder.wait(10)


def test_a_daemon_admission_uses_its_card_and_registers_its_cuda_context(r, monkeypatch):
    monkeypatch.setenv("GENQ_SIMULATED_GPUS", "48GB,80GB")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(GENQ_GPU_INDEX=1, GENQ_HOST="testhost")
    a = memory.daemon_admission(r, settings, "wan-gpu1-testhost-x", "wan")
    snap = a.snapshot()
    assert snap["key"] == "genq:gpu:testhost:1" and snap["capacity"] == GpuInfo(1, "", 80 * GIB).usable_bytes
    assert snap["holders"]["wan-gpu1-testhost-x"] | {"exp": 0, "last": 0} == {
        "family": "wan", "resident": memory.table()["process_overhead_bytes"], "offloadable": 0, "jobs": {},
        "reserved": 0, "exp": 0, "last": 0}
    assert memory.daemon_admission(r, Settings(GENQ_GPU_INDEX=2), "wan-gpu2-x", "wan") is None


def test_a_holder_lost_by_redis_is_rebuilt_from_its_own_account(r):
    a = adm(r, "sdxl-gpu0-a", cap_gib=20)
    a.set_resident(4 * GIB, 3 * GIB)
    assert a.try_reserve("job-a", 10 * GIB)
    r.flushall()  # Redis restarted without persistence
    a.refresh()
    held = a.snapshot()["holders"]["sdxl-gpu0-a"]
    assert (held["resident"], held["offloadable"], held["jobs"]) == (4 * GIB, 3 * GIB, {"job-a": 10 * GIB})
    assert not adm(r, "chat-gpu0-b", cap_gib=20).try_reserve("job-b", 10 * GIB)
