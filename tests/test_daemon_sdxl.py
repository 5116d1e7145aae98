"""The SDXL daemon end to end: real redis-server, real daemon processes on the tiny SDXL, the Storage
stub and a callback receiver that verifies signatures like today's job-callback."""
from __future__ import annotations

import io
import json
import threading

import pytest
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from consumers.cancel import request_cancel
from tests.integration import BUCKET, SERVICE_KEY, encode, load_payload, png_size, stack  # noqa: F401
from tests.stubs.storage import StorageStub

SMALL = {"config__resolution": "128x96", "config__num_inference_steps": 3}
# Long enough that a test reacting to the first progress callback still finds the job running, on a
# fast idle machine too (progress callbacks every 0.5 s in these tests; this runs for seconds).
LONG = {"config__resolution": "192x192", "config__num_inference_steps": 100}


def image_job(**changes) -> dict:
    return load_payload("01_sdxl_fast_1_image.json", **{**SMALL, **changes})


def assert_completed_images(stack, job: dict, width: int, height: int, seeds: list[int]) -> dict:
    body = stack.final_callback(job["id"])
    assert body["status"] == "completed", body
    prefix = f"{job['user_id']}/{job['id']}/"
    assert [a["url"] for a in body["assets"]] == [f"{prefix}{i}.png" for i in range(len(seeds))]
    assert [a["metadata"]["seed"] for a in body["assets"]] == seeds
    stored = stack.stored(prefix)
    assert len(stored) == 2 * len(seeds)  # a PNG and a thumbnail each, nothing else
    for i, asset in enumerate(body["assets"]):
        data, content_type = stored[asset["url"]]
        assert content_type == "image/png" and png_size(data) == (width, height)
        assert asset["metadata"]["file_size_bytes"] == len(data)
        thumb, thumb_type = stored[asset["thumbnail_url"]]
        assert asset["thumbnail_url"] == f"{prefix}{i}.thumb.webp" and thumb_type == "image/webp"
        with Image.open(io.BytesIO(thumb)) as t:
            assert t.format == "WEBP" and max(t.size) == 256
    assert body["metadata"]["seed"] == seeds[0] and body["worker_id"] == "sdxl-gpu0-testhost"
    return body


def test_every_example_payload_in_every_encoding(stack):
    """Also: the seeds, sizes and counts asked for are produced, and jobs enqueued natively with rq run."""
    jobs = []
    for name, size in (("01_sdxl_fast_1_image.json", "128x128"), ("02_sdxl_high_6_images_negative_seed.json", "128x72")):
        for encoding in range(3):
            job = load_payload(name, config__resolution=size, config__num_inference_steps=2)
            stack.r.rpush("sdxl_queue", encode(job, encoding))
            jobs.append(job)
    asked = image_job(config__num_images=3, config__seed=4242, config__resolution="96x160")
    stack.r.rpush("sdxl_queue", encode(asked, 0))
    native = image_job(config__seed=5)
    Queue("sdxl_queue", connection=stack.r, serializer=JSONSerializer).enqueue("consumers.tasks.perform", native,
                                                                                   job_id=native["id"])
    stack.run_burst("sdxl")
    for job in jobs:
        width, height = map(int, job["config"]["resolution"].split("x"))
        seed = job["config"].get("seed")
        n = job["config"]["num_images"]
        if seed is None:  # a random seed is drawn and recorded
            seed = stack.final_callback(job["id"])["metadata"]["seed"]
        body = assert_completed_images(stack, job, width, height, [seed + i for i in range(n)])
        assert body["metadata"]["negative_prompt_used"] is True
    assert_completed_images(stack, asked, 96, 160, [4242, 4243, 4244])
    assert_completed_images(stack, native, 128, 96, [5])
    finished = FinishedJobRegistry("sdxl_queue", connection=stack.r)
    assert {j["id"] for j in jobs + [asked, native]} <= set(finished.get_job_ids())
    assert stack.r.llen("sdxl_queue") == 0


def reference_png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (200, 150), color).save(buf, format="PNG")
    return buf.getvalue()


def test_img2img_uses_the_reference(stack):
    uid = "11111111-1111-4111-8111-111111111111"
    stack.storage.put_object("user-library", f"{uid}/red.png", reference_png((250, 10, 10)))
    stack.storage.put_object("user-library", f"{uid}/blue.png", reference_png((10, 10, 250)))
    common = dict(config__seed=7, config__pipeline="img2img", config__denoise_strength=0.5,
                  config__num_inference_steps=4)
    red = image_job(metadata__reference_image_url=f"user-library/{uid}/red.png", **common)
    blue = image_job(metadata__reference_image_url=stack.storage.sign("user-library", f"{uid}/blue.png"), **common)
    plain = image_job(config__seed=7, config__num_inference_steps=4)
    for job in (red, blue, plain):
        stack.r.rpush("sdxl_queue", encode(job, 0))
    stack.run_burst("sdxl")
    pixels = []
    for job in (red, blue, plain):
        body = assert_completed_images(stack, job, 128, 96, [7])
        assert body["assets"][0]["metadata"]["mode"] == ("txt2img" if job is plain else "img2img")
        data, _ = stack.stored(f"{job['user_id']}/{job['id']}/0.png")[body["assets"][0]["url"]]
        with Image.open(io.BytesIO(data)) as img:
            pixels.append(img.convert("RGB").tobytes())
    # same prompt, seed and steps: only the reference differs, so the images must
    assert len(set(pixels)) == 3


def test_the_png_compress_level_setting_reaches_the_stored_files(stack):
    job = image_job(config__seed=9)
    stack.r.rpush("sdxl_queue", encode(job, 0))
    stack.run_burst("sdxl", GENQ_PNG_COMPRESS_LEVEL="0")
    body = assert_completed_images(stack, job, 128, 96, [9])
    data, _ = stack.stored(f"{job['user_id']}/{job['id']}/")[body["assets"][0]["url"]]
    assert len(data) > 128 * 96 * 3  # level 0 stores the rows uncompressed: the setting was applied


def test_bad_payloads_fail_with_a_signed_callback_and_the_daemon_carries_on(stack):
    wrong_count = image_job(config__num_images=4)
    policy = image_job(prompt="nude photo of a 12 year old")
    bad_ref = image_job(config__pipeline="img2img", metadata__reference_image_url="http://169.254.169.254/x.png")
    good = image_job(config__seed=11)
    stack.r.rpush("sdxl_queue", encode(wrong_count, 1), b"{not json", encode(policy, 2), encode(bad_ref, 0),
                  encode(good, 0))
    stack.run_burst("sdxl")
    body = stack.final_callback(wrong_count["id"])
    assert body["status"] == "failed" and body["error_message"].startswith("config.num_images")
    assert body["metadata"] == {"reason": "invalid_payload", "field": "config.num_images"}
    body = stack.final_callback(policy["id"])
    assert body["status"] == "failed" and body["metadata"]["reason"] == "policy_violation"
    body = stack.final_callback(bad_ref["id"])
    assert body["status"] == "failed" and "metadata.reference_image_url" in body["error_message"]
    assert_completed_images(stack, good, 128, 96, [11])
    for job in (wrong_count, policy, bad_ref):
        assert stack.stored(f"{job['user_id']}/{job['id']}/") == {}
    failed = FailedJobRegistry("sdxl_queue", connection=stack.r, serializer=JSONSerializer)
    ids = failed.get_job_ids()
    assert {wrong_count["id"], policy["id"], bad_ref["id"]} <= set(ids)
    undecodable = [i for i in ids if i.startswith("invalid-")]
    assert len(undecodable) == 1  # kept in rq with its reason, nobody to call back
    job = Job.fetch(undecodable[0], connection=stack.r, serializer=JSONSerializer)
    assert "not JSON" in job.latest_result().exc_string
    # final errors are not retried: one attempt each
    assert Job.fetch(wrong_count["id"], connection=stack.r, serializer=JSONSerializer).retries_left == 0


def test_kill9_mid_job_then_restart_completes_with_no_lost_and_no_extra_files(stack):
    job = image_job(config__num_images=3, config__seed=99, **LONG)
    stack.r.rpush("sdxl_queue", encode(job, 1))
    first = stack.daemon("sdxl")
    stack.receiver.wait_for(lambda b: b["job_id"] == job["id"] and b["status"] == "processing"
                            and b["metadata"]["stage"] == "generating", timeout=300)
    first.kill9()
    assert stack.r.llen("sdxl_queue") == 0  # the job is no longer queued: it lives in rq's started registry
    second = stack.daemon("sdxl")
    assert_completed_images(stack, job, 192, 192, [99, 100, 101])
    second.terminate()
    assert second.wait(60) == 0
    assert stack.r.llen("sdxl_queue") == 0
    assert Job.fetch(job["id"], connection=stack.r, serializer=JSONSerializer).get_status() == "finished"


class HeldStorage(StorageStub):
    """Uploads of one job hang until released: that job is provably still uploading."""

    def __init__(self, held_job: str, **kw):
        super().__init__(**kw)
        self.held_job = held_job
        self.held, self.release = threading.Event(), threading.Event()

    def _upload(self, request, rest):
        if self.held_job in rest:
            self.held.set()
            self.release.wait(120)
        return super()._upload(request, rest)


def test_the_next_job_runs_on_the_gpu_while_the_last_one_uploads(stack):
    first, second = image_job(config__seed=21), image_job(config__seed=22)
    stack.storage.stop()
    stack.storage = HeldStorage(first["id"], service_key=SERVICE_KEY).start()
    daemon = stack.daemon("sdxl", SUPABASE_URL=stack.storage.url)  # two workers by default
    stack.r.rpush("sdxl_queue", encode(first, 0))
    assert stack.storage.held.wait(300), daemon.log()[-3000:]
    stack.r.rpush("sdxl_queue", encode(second, 0))
    assert_completed_images(stack, second, 128, 96, [22])  # ran start to end during the first's upload
    assert [b["status"] for b in stack.callbacks(first["id"])] in ([], ["processing"])
    stack.storage.release.set()
    assert_completed_images(stack, first, 128, 96, [21])


def test_storage_and_callback_outages_are_ridden_out(stack):
    job = image_job(config__seed=3)
    stack.storage.fail_next(3, status=503)  # HTML 5xx pages from a proxy
    stack.receiver.stop()  # the callback endpoint is down for the whole first run
    stack.r.rpush("sdxl_queue", encode(job, 0))
    stack.run_burst("sdxl")
    assert stack.receiver.received == []
    assert stack.r.hlen("genq:outbox") == 1  # the callback waits in Redis
    stack.receiver.start()
    stack.run_burst("sdxl")  # a restarted daemon delivers what was left
    assert_completed_images(stack, job, 128, 96, [3])
    assert stack.r.hlen("genq:outbox") == 0


def test_sigterm_finishes_the_current_job_then_exits(stack):
    job = image_job(config__seed=8, **LONG)
    stack.r.rpush("sdxl_queue", encode(job, 0))
    daemon = stack.daemon("sdxl")
    stack.receiver.wait_for(lambda b: b["job_id"] == job["id"] and b["status"] == "processing", timeout=300)
    daemon.terminate()
    assert daemon.wait(300) == 0
    assert_completed_images(stack, job, 192, 192, [8])


def test_cancelling_a_queued_and_a_running_job(stack):
    queued = image_job(config__seed=1)
    running = image_job(config__seed=2, **LONG)
    after = image_job(config__seed=3)
    request_cancel(stack.r, queued["id"])
    stack.r.rpush("sdxl_queue", encode(queued, 0), encode(running, 0), encode(after, 0))
    daemon = stack.daemon("sdxl")
    stack.receiver.wait_for(lambda b: b["job_id"] == running["id"] and b["status"] == "processing"
                            and b["metadata"]["stage"] == "generating", timeout=300)
    request_cancel(stack.r, running["id"])
    for job in (queued, running):
        body = stack.final_callback(job["id"])
        assert body["status"] == "cancelled"
        assert stack.stored(f"{job['user_id']}/{job['id']}/") == {}
    assert_completed_images(stack, after, 128, 96, [3])  # the GPU went on to the next job
    daemon.terminate()
    assert daemon.wait(60) == 0
    canceled = CanceledJobRegistry("sdxl_queue", connection=stack.r, serializer=JSONSerializer)
    assert {queued["id"], running["id"]} <= set(canceled.get_job_ids())
    events = stack.callbacks(running["id"])
    assert events[-1]["status"] == "cancelled"
    steps = [e["metadata"]["progress"] for e in events[:-1] if e["metadata"].get("stage") == "generating"]
    assert steps and steps[-1] < 100  # stopped early, within a step of the request


def test_progress_callbacks_are_ordered_and_stop_before_the_final_one(stack):
    job = image_job(config__seed=21, **LONG)
    stack.r.rpush("sdxl_queue", encode(job, 0))
    # No interval: the first callback would otherwise come one interval into the job, and whether a tiny
    # job lasts that long depends on this machine. The interval itself is checked on the sender's clock
    # in tests/test_progress_throttle.py.
    stack.run_burst("sdxl", GENQ_PROGRESS_MIN_INTERVAL_S="0")
    events = stack.callbacks(job["id"])
    assert events[-1]["status"] == "completed"
    progress = [e for e in events[:-1]]
    assert progress and all(e["status"] == "processing" for e in progress)
    generating = [e["metadata"]["progress"] for e in progress if e["metadata"]["stage"] == "generating"]
    assert generating == sorted(generating) and all(0 <= p <= 100 for p in generating)
    # the stage's start (0) and at most one a step: never queued up
    assert len(generating) <= 1 + LONG["config__num_inference_steps"]
    meta = Job.fetch(job["id"], connection=stack.r, serializer=JSONSerializer).get_meta()
    assert meta["stage"] == "uploading" or meta["progress"] == 100


def test_the_progress_interval_throttles_the_daemons_callbacks(stack):
    """The interval reaches the daemon: with one far longer than the job, none of its 100 steps sends a
    progress callback (before, this read "far fewer than one per step" at a 1 s interval, which needed the
    job to last over a second to see any callback at all)."""
    job = image_job(config__seed=22, **LONG)
    stack.r.rpush("sdxl_queue", encode(job, 0))
    stack.run_burst("sdxl", GENQ_PROGRESS_MIN_INTERVAL_S="3600")
    assert [e["status"] for e in stack.callbacks(job["id"])] == ["completed"]
    meta = Job.fetch(job["id"], connection=stack.r, serializer=JSONSerializer).get_meta()
    assert meta["progress"] == 100  # the job's own meta is not throttled by the callback interval
