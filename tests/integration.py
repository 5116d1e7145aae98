"""The integration stack: a private redis-server, the Supabase Storage stub, the callback receiver,
and real daemon processes on tiny models. Shared by the daemon tests of every family."""
from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import PAYLOADS, Daemon
from tests.stubs.callback_receiver import CallbackReceiver
from tests.stubs.storage import StorageStub

SECRET, SERVICE_KEY = "test-callback-secret", "test-service-role-key"
BUCKET = "workspace-temp"


def load_payload(name: str, **changes) -> dict:
    job = json.loads((PAYLOADS / name).read_text())
    job_id = str(uuid.uuid4())
    job.update(id=job_id, job_id=job_id)
    for dotted, value in changes.items():
        node = job
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return job


def encode(job: dict, encoding: int) -> str:
    """The three list encodings of contract section 1."""
    text = json.dumps(job)
    return [text, json.dumps([text]), json.dumps([job])][encoding]


def blpop_wait(r, key: str, timeout: float) -> bytes | None:
    """BLPOP in short calls: redis-py 8 reads with a 5 s socket timeout by default."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = r.blpop([key], timeout=2)
        if got is not None:
            return got[1]
    return None


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


class Stack:
    def __init__(self, redis_server, tiny_cache: Path, tmp_path: Path):
        self.redis_server = redis_server
        self.r = redis_server.client()
        self.tmp_path = tmp_path
        self.storage = StorageStub(service_key=SERVICE_KEY)
        self.receiver = CallbackReceiver(secret=SECRET, service_key=SERVICE_KEY)
        self.storage.start()
        self.receiver.start()
        self.env = {
            "REDIS_URL": redis_server.url, "SUPABASE_URL": self.storage.url,
            "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY, "JOB_CALLBACK_URL": self.receiver.url,
            "JOB_CALLBACK_SECRET": SECRET, "GENQ_TINY_CACHE": str(tiny_cache),
            "SDXL_MODEL_PATH": "tiny", "WAN_VACE_MODEL_PATH": "tiny", "QWEN_INSTRUCT_MODEL_PATH": "tiny",
            "GENQ_JOB_HEARTBEAT_TTL_S": "5", "GENQ_MAINTENANCE_INTERVAL_S": "1",
            "GENQ_PROGRESS_MIN_INTERVAL_S": "0.5", "GENQ_HOST": "testhost",
        }
        self.daemons: list[Daemon] = []

    def daemon(self, family: str, burst: bool = False, **env) -> Daemon:
        d = Daemon(family, {**self.env, **env}, self.tmp_path / f"{family}-{len(self.daemons)}.log", burst=burst)
        self.daemons.append(d)
        return d

    def run_burst(self, family: str, **env) -> Daemon:
        d = self.daemon(family, burst=True, **env)
        code = d.wait(600)
        assert code == 0, d.log()[-3000:]
        return d

    def final_callback(self, job_id: str, timeout: float = 300) -> dict:
        return self.receiver.wait_for(
            lambda b: b["job_id"] == job_id and b["status"] in ("completed", "failed", "cancelled"), timeout)

    def callbacks(self, job_id: str) -> list[dict]:
        return [b for b in list(self.receiver.received) if b["job_id"] == job_id]

    def stored(self, prefix: str) -> dict[str, tuple[bytes, str]]:
        return {path: obj for (bucket, path), obj in dict(self.storage.objects).items()
                if bucket == BUCKET and path.startswith(prefix)}

    def close(self) -> None:
        for d in self.daemons:
            d.close()
        self.receiver.stop()
        self.storage.stop()


@pytest.fixture
def stack(redis_server, tiny_cache, tmp_path):
    redis_server.client().flushall()
    s = Stack(redis_server, tiny_cache, tmp_path)
    yield s
    s.close()
