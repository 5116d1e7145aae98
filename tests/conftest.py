"""Shared fixtures: a private redis-server per test module, the tiny-model cache, daemon processes."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
# A copy of ../shared/contract/payloads: the examples today's queue-job edge function builds.
PAYLOADS = ROOT / "tests" / "payloads"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own, so tests may stop, restart or flush it freely."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:  # readiness poll of a process we just started, not a synchronisation sleep
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server) -> redis.Redis:
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny-model cache for the whole run (models are built once, then loaded like real ones)."""
    env = os.environ.get("GENQ_TEST_TINY_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("tiny-models")


def daemon_env(base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "SUPABASE_", "JOB_CALLBACK"))}
    env.update({"GENQ_DEVICE": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})
    env.update(base)
    return env


class Daemon:
    """`python -m consumers <family>` as a real child process."""

    def __init__(self, family: str, env: dict[str, str], log_path: Path, burst: bool = False):
        args = [sys.executable, "-m", "consumers", family] + (["--burst"] if burst else [])
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=daemon_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


@pytest.fixture
def tiny_wan_video():
    """render(pipe, steps): a 5-frame 32x32 video from a tiny WAN pipeline, the same prompt embeddings and seed
    on every call."""
    import torch

    emb = torch.randn(1, 16, 32, dtype=torch.bfloat16)

    def render(pipe, steps: int = 2):
        return pipe(prompt_embeds=emb, negative_prompt_embeds=emb, height=32, width=32, num_frames=5,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    return render
