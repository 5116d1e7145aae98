"""End-to-end demo on a machine with no GPU, no Supabase and no Redis configured.

Starts a Redis of its own, a local callback receiver that verifies signatures like today's
job-callback, and the three daemons on tiny random-weight models (CPU). Then it pushes jobs exactly
as the edge functions do (RPUSH of today's payloads) and prints what came back and where the files are.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.stubs.callback_receiver import CallbackReceiver  # noqa: E402

PAYLOADS = ROOT / "tests" / "payloads"
OUT = ROOT / "outputs" / "demo"
SECRET, SERVICE_KEY = "demo-callback-secret", "demo-service-role-key"
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis() -> tuple[str, object]:
    port = free_port()
    exe = shutil.which("redis-server")
    if exe:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL)
        stop = proc.terminate
    else:  # no redis-server installed: fakeredis speaks the protocol over TCP
        from fakeredis import TcpFakeServer

        server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stop = server.shutdown
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return url, stop
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("could not start an embedded Redis")


def sdxl_job(user_id: str) -> str:
    """Today's payload as the REST RPUSH stores it (a JSON array holding one JSON string)."""
    job = json.loads((PAYLOADS / "02_sdxl_high_6_images_negative_seed.json").read_text())
    job_id = str(uuid.uuid4())
    job.update(id=job_id, job_id=job_id, user_id=user_id)
    job["config"].update(num_images=3, resolution="512x512", num_inference_steps=8)
    return json.dumps([json.dumps(job)])


def wan_job(user_id: str) -> str:
    job = json.loads((PAYLOADS / "06_wan_video_fast_t2v.json").read_text())
    job_id = str(uuid.uuid4())
    job.update(id=job_id, job_id=job_id, user_id=user_id)
    job["config"].update(num_inference_steps=4, seed=42)
    job["metadata"].update(duration=1, aspect_ratio="16:9")  # 17 frames at 832x480, small enough for a CPU
    return json.dumps(job)


def chat_job(reply_key: str) -> str:
    request = json.loads((PAYLOADS / "22_chat_request.json").read_text())
    request["max_tokens"] = 24
    return json.dumps({"id": str(uuid.uuid4()), "type": "chat", "reply_key": reply_key,
                       "deadline_ms": int((time.time() + 600) * 1000), "request": request})


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    redis_url, stop_redis = start_redis()
    r = redis.Redis.from_url(redis_url)
    receiver = CallbackReceiver(secret=SECRET, service_key=SERVICE_KEY)
    receiver.start()
    env = dict(os.environ, REDIS_URL=redis_url, JOB_CALLBACK_URL=receiver.url, JOB_CALLBACK_SECRET=SECRET,
               SUPABASE_SERVICE_ROLE_KEY=SERVICE_KEY, GENQ_STORAGE="local", GENQ_OUTPUT_DIR=str(OUT),
               SDXL_MODEL_PATH="tiny", WAN_VACE_MODEL_PATH="tiny", QWEN_INSTRUCT_MODEL_PATH="tiny",
               GENQ_DEVICE="cpu", GENQ_PROGRESS_MIN_INTERVAL_S="1", PYTHONUNBUFFERED="1")
    logs = {f: open(OUT / f"{f}.log", "wb") for f in ("sdxl", "wan", "chat")}
    daemons = {f: subprocess.Popen([sys.executable, "-m", "consumers", f], cwd=ROOT, env=env,
                                   stdout=logs[f], stderr=subprocess.STDOUT) for f in logs}
    started = time.monotonic()
    try:
        user_id = str(uuid.uuid4())
        print(f"redis {redis_url}; callback receiver {receiver.url}; outputs under {OUT}")
        sdxl_raw, wan_raw = sdxl_job(user_id), wan_job(user_id)
        reply_key = f"demo:reply:{uuid.uuid4()}"
        r.rpush("sdxl_queue", sdxl_raw)  # exactly what queue-job does through Upstash's REST API
        r.rpush("wan_queue", wan_raw)
        r.rpush("chat_queue", chat_job(reply_key))
        print(f"pushed: sdxl_queue={r.llen('sdxl_queue')} wan_queue={r.llen('wan_queue')} "
              f"chat_queue={r.llen('chat_queue')}")

        got = None
        deadline = time.monotonic() + TIMEOUT_S
        while got is None and time.monotonic() < deadline:
            got = r.blpop([reply_key], timeout=2)  # short calls: redis-py reads with a 5 s timeout
        if got is None:
            raise SystemExit("no chat reply: see outputs/demo/chat.log")
        reply = json.loads(got[1])
        print(f"\nchat reply ({reply['tokens_generated']} tokens, tiny random model so the words are noise):"
              f"\n  {reply['response'][:120]!r}")

        for name, raw in (("sdxl", sdxl_raw), ("wan", wan_raw)):
            job = json.loads(raw)
            job = json.loads(job[0]) if isinstance(job, list) else job
            body = receiver.wait_for(lambda b, i=job["id"]: b["job_id"] == i and b["status"] != "processing",
                                     timeout=TIMEOUT_S)
            if body["status"] != "completed":
                raise SystemExit(f"{name} job ended {body['status']}: {body.get('error_message')}")
            progress = [b["metadata"]["progress"] for b in receiver.received
                        if b["job_id"] == job["id"] and b["status"] == "processing"]
            print(f"\n{name}: callback verified (sha256 HMAC), status completed, progress seen {progress}")
            for asset in body["assets"]:
                meta = asset["metadata"]
                path = OUT / "workspace-temp" / asset["url"]
                print(f"  {asset['type']} {meta['width']}x{meta['height']} seed={meta['seed']} "
                      f"{path} ({path.stat().st_size} bytes)")
        print(f"\ndone in {time.monotonic() - started:.0f}s (daemon logs in {OUT})")
        return 0
    finally:
        for proc in daemons.values():
            proc.send_signal(signal.SIGTERM)
        for proc in daemons.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        receiver.stop()
        stop_redis()


if __name__ == "__main__":
    sys.exit(main())
