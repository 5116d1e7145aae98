"""orchestrator.py: plans on simulated cards, and the supervisor with real child processes and a real Redis.

Supervisor mechanics use a trivial child (GENQ_CONSUMER_COMMAND) that reports to Redis; the daemon
itself is exercised end to end in test_orchestrator_daemon_e2e.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rq import Worker

import memory
import orchestrator
from memory import GIB, GpuInfo
from orchestrator import OrchestratorSettings, PlanError, build_plan
from schemas.settings import Settings
from tests.conftest import ROOT, daemon_env
from tests.integration import SERVICE_KEY, Stack, load_payload
from tests.stubs.storage import StorageStub
from tests.test_memory import REAL, until

# --- plans --------------------------------------------------------------------------------------------
def cards(*sizes: int) -> list[GpuInfo]:
    return [GpuInfo(i, f"{s}GB card", s * GIB) for i, s in enumerate(sizes)]


def placed(checks) -> dict[int, tuple[str, ...]]:
    return {c.plan.gpu.index: c.plan.families for c in checks}


def test_plan_one_48gb_card_serves_everything_by_offloading_idle_models():
    checks = build_plan(Settings(**REAL), OrchestratorSettings(), cards(48))
    assert placed(checks) == {0: ("sdxl", "wan", "chat")}
    assert checks[0].offload
    assert any("rejected unless another GPU" in n for n in checks[0].notes)  # 1536x1536 x6 cannot fit


def test_plan_one_80gb_card_keeps_every_model_resident():
    checks = build_plan(Settings(**REAL), OrchestratorSettings(), cards(80))
    assert placed(checks) == {0: ("sdxl", "wan", "chat")} and not checks[0].offload


def test_plan_two_80gb_cards_run_every_family_on_each():
    checks = build_plan(Settings(**REAL), OrchestratorSettings(), cards(80, 80))
    assert placed(checks) == {0: ("sdxl", "wan", "chat"), 1: ("sdxl", "wan", "chat")}


def test_plan_follows_families_and_placement_from_settings():
    o = OrchestratorSettings(families="sdxl,chat", placement="sdxl:0,chat:1")
    assert placed(build_plan(Settings(**REAL), o, cards(80, 80))) == {0: ("sdxl",), 1: ("chat",)}


def test_plan_that_cannot_fit_says_precisely_why():
    with pytest.raises(PlanError) as err:
        build_plan(Settings(**REAL), OrchestratorSettings(placement="sdxl:0,wan:0,chat:2"), cards(24, 24))
    assert err.value.problems == ["GENQ_PLACEMENT 'chat:2': no visible GPU '2' (visible: [0, 1])"]
    with pytest.raises(PlanError) as err:
        build_plan(Settings(**REAL), OrchestratorSettings(placement="sdxl:0,wan:0"), cards(24))
    sdxl_problem = err.value.problems[0]
    assert sdxl_problem.startswith("GPU 0 (24GB card, 23.5 GiB usable): sdxl cannot run its reference job "
                                   "(1024x1024 x6 image(s))")
    assert "1 other daemon(s)" in sdxl_problem
    with pytest.raises(PlanError, match="GENQ_FAMILIES names wan but no model path is set"):
        build_plan(Settings(SDXL_MODEL_PATH="/m"), OrchestratorSettings(families="sdxl,wan"), cards(80))


# --- supervisor with trivial children ------------------------------------------------------------------
CHILD = r'''
import os, signal, sys, time, redis
r = redis.Redis.from_url(os.environ["REDIS_URL"])
family, gpu = sys.argv[1], sys.argv[2]
mode = os.environ.get("CHILD_MODE_" + family.upper(), "serve")
term = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else (lambda *a: term.append(1)))
n = r.incr(f"t:starts:{family}")
r.rpush("t:started", f"{family}:{gpu}:{os.getpid()}:{os.environ['CUDA_VISIBLE_DEVICES']}:{os.environ['GENQ_GPU_INDEX']}")
if mode == "crash" or (mode == "exit0-once" and n == 1):
    sys.exit(3 if mode == "crash" else 0)
while not term:
    time.sleep(0.05)
r.rpush("t:sigterm", family)
if mode == "job":  # a job in flight: it ends when the test says so, then the process exits
    r.blpop("t:finish", 60)
    r.rpush("t:done", family)
'''


class Orch:
    """`python orchestrator.py` as a real process, its children writing to Redis."""

    def __init__(self, tmp_path: Path, redis_url: str, gpus: str, placement: str, **env: str):
        child = tmp_path / "child.py"
        child.write_text(CHILD)
        self.log_path = tmp_path / "orchestrator.log"
        base = {"REDIS_URL": redis_url, "GENQ_SIMULATED_GPUS": gpus, "GENQ_PLACEMENT": placement,
                "SDXL_MODEL_PATH": "tiny", "WAN_MODEL_PATH": "tiny", "QWEN_INSTRUCT_MODEL_PATH": "tiny",
                "GENQ_CONSUMER_COMMAND": f"{{python}} {child} {{family}} {{gpu}}", "GENQ_HOST": "testhost",
                "GENQ_RESTART_BASE_S": "0.05", "GENQ_RESTART_MAX_S": "0.2", "GENQ_STATUS_INTERVAL_S": "0.2",
                "GENQ_CRASH_LOOP_RESTARTS": "2", "GENQ_GRACE_S": "60", **env}
        self.env = daemon_env(base)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "orchestrator.py"], cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self, r) -> dict:
        raw = r.hget(memory.SUPERVISOR_KEY.format(host="testhost"), "children")
        return {f"{c['family']}:{c['gpu']}": c for c in json.loads(raw or "[]")}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def orch(tmp_path, redis_server, r):
    started: list[Orch] = []

    def start(gpus: str = "80GB,80GB", placement: str = "sdxl:0,chat:1", **env: str) -> Orch:
        started.append(Orch(tmp_path, redis_server.url, gpus, placement, **env))
        return started[-1]

    yield start
    for o in started:
        o.close()


def next_start(r) -> tuple[str, str, int, str, str]:
    item = r.blpop("t:started", 30)
    assert item, "no child started"
    family, gpu, pid, visible, index = item[1].decode().split(":")
    return family, gpu, int(pid), visible, index


def test_children_get_their_gpu_and_a_killed_child_is_restarted(orch, r):
    o = orch()
    first = {f"{s[0]}:{s[1]}": s for s in (next_start(r), next_start(r))}
    assert set(first) == {"sdxl:0", "chat:1"}
    assert all(s[3] == s[1] == s[4] for s in first.values())  # CUDA_VISIBLE_DEVICES = GENQ_GPU_INDEX = the card
    os.kill(first["sdxl:0"][2], signal.SIGKILL)
    again = next_start(r)
    assert again[:2] == ("sdxl", "0") and again[2] != first["sdxl:0"][2]
    assert until(lambda: o.status(r).get("sdxl:0", {}).get("restarts") == 1, what="restart in status")
    assert o.stop() == 0
    assert sorted(x.decode() for x in r.lrange("t:sigterm", 0, -1)) == ["chat", "sdxl"]


def test_an_exit_with_code_0_is_not_taken_as_normal(orch, r):
    o = orch(CHILD_MODE_CHAT="exit0-once")
    starts = [next_start(r)[0] for _ in range(3)]
    assert sorted(starts) == ["chat", "chat", "sdxl"]
    assert until(lambda: o.status(r).get("chat:1", {}).get("last_exit") == 0, what="the exit in status")
    assert o.stop() == 0


def test_a_crash_loop_is_stopped_and_reported(orch, r, redis_server):
    o = orch(CHILD_MODE_SDXL="crash")
    assert until(lambda: o.status(r).get("sdxl:0", {}).get("state") == "crash_loop", what="crash_loop state")
    assert o.status(r)["chat:1"]["state"] == "running"
    shown = subprocess.run([sys.executable, "-m", "orchestrator", "status"], cwd=ROOT, env=o.env, capture_output=True,
                           text=True, timeout=60)
    assert "sdxl  gpu0  crash_loop" in shown.stdout, shown.stdout + shown.stderr
    assert o.stop() == 0
    assert int(r.get("t:starts:sdxl")) == 3  # the first run and 2 restarts, then never again
    assert "sdxl@gpu0 crash-loops" in o.log()


def test_when_every_daemon_crash_loops_the_orchestrator_exits(orch, r):
    o = orch(placement="sdxl:0", CHILD_MODE_SDXL="crash")
    assert o.proc.wait(60) == orchestrator.EXIT_CRASH_LOOP
    assert o.status(r)["sdxl:0"]["state"] == "crash_loop"


def test_sigterm_lets_a_job_in_flight_finish(orch, r):
    o = orch(placement="chat:0", CHILD_MODE_CHAT="job")
    next_start(r)
    o.proc.send_signal(signal.SIGTERM)
    assert r.blpop("t:sigterm", 30)  # forwarded to the daemon, which keeps working on its job
    r.rpush("t:finish", "go")
    assert o.proc.wait(60) == 0
    assert r.lrange("t:done", 0, -1) == [b"chat"]
    assert o.status(r)["chat:0"]["state"] == "stopped"


def test_a_daemon_that_outlives_the_grace_period_is_killed(orch, r):
    o = orch(placement="chat:0", CHILD_MODE_CHAT="stubborn", GENQ_GRACE_S="0.5")
    pid = next_start(r)[2]
    assert o.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "still running after the grace period: SIGKILL" in o.log()


def test_an_impossible_plan_starts_nothing(orch, r):
    o = orch(gpus="16GB", placement="", SDXL_MODEL_PATH="/models/sdxl")
    assert o.proc.wait(60) == orchestrator.EXIT_PLAN
    assert "sdxl fits on no visible GPU" in o.log()
    assert r.llen("t:started") == 0


def test_status_joins_rq_workers_admission_and_daemon_hashes(r, redis_server):
    name = "sdxl-gpu0-testhost-abc123"
    worker = Worker(["sdxl_queue"], connection=r, name=name)
    worker.register_birth()
    worker.set_current_job_id("job-1")
    memory.Admission(r, "testhost", 0, 48 * GIB, name).set_resident(8 * GIB)
    memory.Admission(r, "testhost", 0, 48 * GIB, name).try_reserve("job-1", 3 * GIB)
    r.hset(memory.DAEMON_KEY.format(worker=name), mapping={"family": "sdxl", "gpu": 0, "progress": "7/15",
                                                             "models": "unet,text_encoders,vae"})
    env = daemon_env({"REDIS_URL": redis_server.url})
    out = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    (row,) = json.loads(out.stdout)["daemons"]
    assert row | {"last_heartbeat": None, "pid": None, "host": None} == {
        "worker": name, "host": None, "pid": None, "state": "?", "workers": 1, "family": "sdxl", "gpu": "0",
        "last_heartbeat": None, "current_job": "job-1", "progress": "7/15", "models": "unet,text_encoders,vae",
        "resident_bytes": 8 * GIB, "reserved_bytes": 3 * GIB, "waiting": None, "asked_to_offload": None}


# --- end to end with the real daemon ---------------------------------------------------------------------
class HeldStorage(StorageStub):
    """Storage whose uploads wait for a go: a job is provably in flight while its upload hangs."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.upload_started, self.go = threading.Event(), threading.Event()

    def _upload(self, request, rest):
        self.upload_started.set()
        self.go.wait(120)
        return super()._upload(request, rest)


@pytest.mark.slow
def test_orchestrator_daemon_e2e_job_cut_off_by_the_grace_period_is_not_lost(redis_server, tiny_cache, tmp_path):
    redis_server.client().flushall()
    stack = Stack(redis_server, tiny_cache, tmp_path)
    stack.storage.stop()
    stack.storage = HeldStorage(service_key=SERVICE_KEY).start()
    env = daemon_env({**stack.env, "SUPABASE_URL": stack.storage.url, "GENQ_SIMULATED_GPUS": "80GB",
                      "GENQ_PLACEMENT": "sdxl:0", "GENQ_FAMILIES": "sdxl", "GENQ_GRACE_S": "1"})

    def start(name: str) -> subprocess.Popen:
        with open(tmp_path / name, "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)

    first = start("first.log")
    try:
        job = load_payload("01_sdxl_fast_1_image.json", config__resolution="64x64", config__num_inference_steps=2)
        stack.r.rpush("sdxl_queue", json.dumps(job))
        assert stack.storage.upload_started.wait(300), (tmp_path / "first.log").read_text()[-3000:]
        shown = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--json"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60, check=True)
        (row,) = json.loads(shown.stdout)["daemons"]
        assert row["family"] == "sdxl" and row["current_job"] == job["id"]
        first.send_signal(signal.SIGTERM)
        assert first.wait(120) == 0
        assert "still running after the grace period: SIGKILL" in (tmp_path / "first.log").read_text()
        assert stack.receiver.received == [] or all(b["status"] == "processing" for b in stack.callbacks(job["id"]))

        stack.storage.go.set()
        second = start("second.log")
        try:
            final = stack.final_callback(job["id"], timeout=300)
            assert final["status"] == "completed", final
            assert second.poll() is None  # still serving
            second.send_signal(signal.SIGTERM)
            assert second.wait(120) == 0
        finally:
            second.kill()
    finally:
        first.kill()
        stack.storage.go.set()
        stack.close()
