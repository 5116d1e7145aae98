"""The whole system on one simulated 48 GB card: the orchestrator runs all three daemons with VRAM
admission on, a mixed stream of 6-image SDXL jobs, videos and chats goes through, a daemon killed with
SIGKILL in the middle is restarted, and nothing is lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, daemon_env
from tests.integration import Stack, blpop_wait, encode, load_payload
from tests.test_daemon_chat import chat_job


def status(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_mixed_stream_on_a_simulated_48gb_card_loses_nothing(redis_server, tiny_cache, tmp_path):
    redis_server.client().flushall()
    stack = Stack(redis_server, tiny_cache, tmp_path)
    env = daemon_env({**stack.env, "GENQ_SIMULATED_GPUS": "48GB", "GENQ_GRACE_S": "60",
                      "GENQ_RESTART_BASE_S": "0.5"})
    log = open(tmp_path / "orchestrator.log", "wb")
    orch = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        images = [load_payload("02_sdxl_high_6_images_negative_seed.json", config__resolution="64x64",
                               config__num_inference_steps=3) for _ in range(3)]
        videos = [load_payload("06_wan_video_fast_t2v.json", metadata__duration=0.3, metadata__aspect_ratio="16:9",
                               config__num_inference_steps=2, config__seed=9) for _ in range(2)]
        chats = [chat_job(max_tokens=8) for _ in range(3)]
        for i in range(3):
            stack.r.rpush("sdxl_queue", encode(images[i], i))
            stack.r.rpush("chat_queue", json.dumps(chats[i]))
            if i < 2:
                stack.r.rpush("wan_queue", encode(videos[i], i))

        # kill the SDXL daemon with SIGKILL while it works on the stream
        first = stack.receiver.wait_for(lambda b: b["job_id"] in {j["id"] for j in images}, timeout=300)
        rows = [d for d in status(env)["daemons"] if d["family"] == "sdxl"]
        assert rows and rows[0]["gpu"] in (0, "0")
        os.kill(int(rows[0]["pid"]), signal.SIGKILL)

        for job in images:
            body = stack.final_callback(job["id"], timeout=400)
            assert body["status"] == "completed", body
            assert len(body["assets"]) == 6
        for job in videos:
            body = stack.final_callback(job["id"], timeout=400)
            assert body["status"] == "completed" and body["assets"][0]["metadata"]["frame_num"] == 5
        for job in chats:
            answer = json.loads(blpop_wait(stack.r, job["reply_key"], 300))
            assert answer["success"] is True
        assert first  # the kill came after the stream had started
        for queue in ("sdxl_queue", "wan_queue", "chat_queue"):
            assert stack.r.llen(queue) == 0
        failed = [b for b in stack.receiver.received if b["status"] == "failed"]
        assert failed == []  # in particular no out-of-memory failure
        shown = status(env)
        assert {d["family"] for d in shown["daemons"]} >= {"sdxl", "wan", "chat"}
    finally:
        orch.send_signal(signal.SIGTERM)
        try:
            assert orch.wait(120) == 0, (tmp_path / "orchestrator.log").read_text()[-3000:]
        finally:
            orch.kill()
            log.close()
            stack.close()
