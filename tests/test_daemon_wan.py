"""The WAN daemon end to end on the tiny WAN (VACE) model: every reference mode, MP4s read back from
storage, image job types, cancellation of a running video, a fast-mode job."""
from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

from consumers.cancel import request_cancel
from tests.integration import encode, load_payload, stack  # noqa: F401

UID = "11111111-1111-4111-8111-111111111111"
SHORT = {"metadata__duration": 0.3, "metadata__aspect_ratio": "16:9", "config__num_inference_steps": 2,
         "config__seed": 1234}  # 5 frames at 832x480


def video_job(mode: str, refs: dict[str, str], **changes) -> dict:
    job = load_payload("07_wan_video_high_start_end_refs.json", **{**SHORT, **changes})
    job["metadata"].update(video_reference_mode=mode, start_reference_url=None, end_reference_url=None)
    for key in ("first_frame", "last_frame", "image"):
        job["config"].pop(key, None)
    job["config"].update(refs)
    return job


def read_mp4(data: bytes) -> tuple[np.ndarray, int, int, float, str, str]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return (frames, stream.codec_context.width, stream.codec_context.height, float(stream.average_rate),
                stream.codec_context.name, stream.codec_context.pix_fmt)


def test_every_reference_mode_produces_a_conditioned_playable_mp4(stack):
    """Also: mode none ignores (null) reference fields, and an image job type gives a PNG."""
    def ref(color) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), color).save(buf, format="PNG")
        path = f"{UID}/ref-{color[0]}-{color[2]}.png"
        stack.storage.put_object("user-library", path, buf.getvalue())
        return stack.storage.sign("user-library", path)

    first, last, single = ref((255, 0, 0)), ref((0, 0, 255)), ref((0, 255, 0))
    # mode none with reference fields present (null, as today's payloads send them) ignores them
    with_nulls = video_job("none", {})
    with_nulls["metadata"].update(start_reference_url=None, end_reference_url=None)
    image = load_payload("06_wan_video_fast_t2v.json", type="image_fast", job_type="wan_image_fast",
                         config__num_inference_steps=2, config__seed=5, metadata__aspect_ratio="9:16")
    jobs = {
        "none": video_job("none", {}),
        "single": video_job("single", {"image": single}),
        "start": video_job("start", {"first_frame": first}),
        "end": video_job("end", {"last_frame": last}),
        "both": video_job("both", {"first_frame": first, "last_frame": last}),
    }
    for job in [*jobs.values(), with_nulls, image]:
        stack.r.rpush("wan_queue", encode(job, 1))
    stack.run_burst("wan")
    videos = {}
    for mode, job in jobs.items():
        body = stack.final_callback(job["id"])
        assert body["status"] == "completed", body
        (asset,) = body["assets"]
        prefix = f"{job['user_id']}/{job['id']}/"
        assert asset["type"] == "video" and asset["url"] == f"{prefix}0.mp4"
        assert asset["thumbnail_url"] == f"{prefix}0.thumb.webp"
        meta = asset["metadata"]
        assert (meta["width"], meta["height"], meta["frame_num"], meta["seed"]) == (832, 480, 5, 1234)
        assert body["metadata"]["frame_num"] == 5 and body["metadata"]["seed"] == 1234
        stored = stack.stored(prefix)
        assert set(stored) == {f"{prefix}0.mp4", f"{prefix}0.thumb.webp"}
        data, content_type = stored[f"{prefix}0.mp4"]
        assert content_type == "video/mp4"
        frames, width, height, fps, codec, pix_fmt = read_mp4(data)
        assert (len(frames), width, height, fps, codec, pix_fmt) == (5, 832, 480, 16.0, "h264", "yuv420p")
        assert stored[f"{prefix}0.thumb.webp"][1] == "image/webp"
        videos[mode] = frames.astype(np.int16)
    for mode in ("single", "start", "end", "both"):
        assert np.abs(videos[mode] - videos["none"]).mean() > 0.5, mode  # the reference changed the video
    assert stack.final_callback(with_nulls["id"])["status"] == "completed"
    body = stack.final_callback(image["id"])
    assert body["status"] == "completed"
    (asset,) = body["assets"]
    assert asset["type"] == "image" and asset["url"].endswith("/0.png")
    data, content_type = stack.stored(asset["url"])[asset["url"]]
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size, content_type) == ("PNG", (480, 832), "image/png")


def test_a_running_video_is_cancelled_within_a_step_and_the_next_job_runs(stack):
    long = video_job("none", {}, config__num_inference_steps=100)
    after = video_job("none", {})
    stack.r.rpush("wan_queue", encode(long, 0), encode(after, 0))
    daemon = stack.daemon("wan")
    stack.receiver.wait_for(lambda b: b["job_id"] == long["id"] and b["status"] == "processing"
                            and b["metadata"]["stage"] == "generating", timeout=300)
    request_cancel(stack.r, long["id"])
    assert stack.final_callback(long["id"])["status"] == "cancelled"
    assert stack.final_callback(after["id"])["status"] == "completed"
    daemon.terminate()
    assert daemon.wait(60) == 0
    assert stack.stored(f"{long['user_id']}/{long['id']}/") == {}


def test_a_fast_mode_job_completes_and_says_so_in_its_callback(stack):
    """config.fast_mode: true runs with the step cache at WAN_FAST_THRESHOLD and the callback says so; a
    normal job's callback has no fast-mode keys; a fast_mode that is not a boolean fails naming it."""
    fast = video_job("none", {"fast_mode": True}, config__num_inference_steps=3)
    normal = load_payload("06_wan_video_fast_t2v.json", type="image_fast", job_type="wan_image_fast",
                          config__num_inference_steps=2, config__seed=5)
    wrong = video_job("none", {"fast_mode": "yes"})
    for job in (fast, normal, wrong):
        stack.r.rpush("wan_queue", encode(job, 1))
    stack.run_burst("wan", WAN_FAST_THRESHOLD="0.5")
    body = stack.final_callback(fast["id"])
    assert body["status"] == "completed", body
    assert body["metadata"]["fast_mode"] is True and body["metadata"]["fast_mode_threshold"] == 0.5
    frames, *_ = read_mp4(stack.stored(body["assets"][0]["url"])[body["assets"][0]["url"]][0])
    assert len(frames) == 5
    body = stack.final_callback(normal["id"])
    assert body["status"] == "completed", body
    assert not {"fast_mode", "fast_mode_threshold"} & (set(body["metadata"]) | set(body["assets"][0]["metadata"]))
    body = stack.final_callback(wrong["id"])
    assert body["status"] == "failed" and body["metadata"]["field"] == "config.fast_mode", body
