"""The production stack on one GPU with full-size random-weight models, in one device call
(issue 4 item 7; issue 5's daemon overhead and I/O overlap).

    python -m bench.stack [--tiny] [--out DIR] [--budget-s S] [--scenarios 48GB,full]
                          [--redis-server PATH] [--redis-lib DIR] [--models DIR]

Stages, each recorded in OUT/stack.json as soon as it ends (a run cut off still returns figures):

  build      bench.full_models in a child process (CUDA never touches this process): the SDXL, WAN
             T2V and Qwen 2.5 7B folders, bytes written and seconds
  coldread   page cache dropped (drop_caches, else per-file fadvise DONTNEED), each folder read from
             disk, then again from the cache; the cache is dropped once more before the first scenario
  48GB       redis-server, the Storage stub and the signature-checking callback receiver (tests/stubs),
             then `bash startup.sh` (checks, plan, exec the orchestrator: sdxl, wan and chat daemons on
             the one card) with GENQ_SIMULATED_GPUS=48GB, while a thread samples the card's used memory
             (NVML) every 0.2 s. Daemon load times from their logs; a mixed stream of today's payloads
             (RPUSH, as queue-job does); `python -m orchestrator status` mid-stream; checks (every job
             completed, no OOM, callbacks verified, bytes stored); daemon overhead (1-image jobs one at
             a time: end-to-end vs the callback's generation_time); I/O overlap (4 jobs pushed at once:
             wall time vs the sum of their generation times); SIGTERM drain
  full       the same on the card's real capacity (NVML plan), when the budget allows

--tiny runs the same code on this CPU: tiny configs through the same save code, GENQ_DEVICE=cpu,
small job shapes, and an 80 GB simulated card standing in for the real one.
Files in OUT (at most 8): stack.json, memory.json, build.log, orchestrator-<scenario>.log,
status-<scenario>.txt (and stack.log from bench/run_stack.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.full_models import FOLDERS, FULL_DISK_BYTES, env_for  # noqa: E402  (no torch at import)
from tests.stubs.callback_receiver import CallbackReceiver  # noqa: E402
from tests.stubs.storage import StorageStub  # noqa: E402

PAYLOADS = ROOT / "tests" / "payloads"
SECRET, SERVICE_KEY, BUCKET, HOST = "bench-callback-secret", "bench-service-role-key", "workspace-temp", "bench"
GIB = 1024**3
FAMILIES = ("sdxl", "wan", "chat")
QUEUES = {"sdxl": "sdxl_queue", "wan": "wan_queue", "chat": "chat_queue"}
TERMINAL = ("completed", "failed", "cancelled")
LOG_CAP = 15 * 1024**2


# --- profiles: job shapes and time budgets ------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    sdxl_res: str
    sdxl6: int            # 6-image jobs in the mixed stream
    sdxl6_steps: int
    sdxl1: int            # 1-image jobs in the mixed stream
    sdxl1_steps: int
    videos: tuple         # (duration s, steps) per WAN video, 9:16 -> 480x832
    chats: int
    chat_tokens: int
    overhead_jobs: int    # 1-image SDXL jobs run one at a time
    overlap_jobs: int     # SDXL jobs pushed at once
    overlap_images: int
    overlap_steps: int
    stream_timeout_s: float
    ready_timeout_s: float
    need_scenario_s: float  # budget a scenario needs to start
    need_overhead_s: float
    need_overlap_s: float
    warmup: dict = field(default_factory=dict)  # SDXL_WARMUP_* per scenario name


FULL = Profile(sdxl_res="1024x1024", sdxl6=3, sdxl6_steps=25, sdxl1=4, sdxl1_steps=15,
               videos=((5.0, 8), (2.0, 8)), chats=16, chat_tokens=64, overhead_jobs=8,
               overlap_jobs=4, overlap_images=6, overlap_steps=15, stream_timeout_s=300,
               ready_timeout_s=300, need_scenario_s=170, need_overhead_s=40, need_overlap_s=60)
               # No SDXL_WARMUP_*: on the 48 GB card the daemon picks the largest job that fits there.
TINY = Profile(sdxl_res="64x64", sdxl6=2, sdxl6_steps=3, sdxl1=2, sdxl1_steps=2,
               videos=((0.3, 2), (0.3, 2)), chats=6, chat_tokens=8, overhead_jobs=3,
               overlap_jobs=4, overlap_images=6, overlap_steps=2, stream_timeout_s=150,
               ready_timeout_s=150, need_scenario_s=60, need_overhead_s=8, need_overlap_s=8,
               warmup={"48GB": (64, 64, 1), "full": (64, 64, 1)})


# --- the run: budget, results written as they come ------------------------------------------------------

class Run:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget, self.t0 = out, budget_s, time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"started": datetime.now().isoformat(timespec="seconds"), "budget_s": budget_s,
                           "stages": {}}
        self.on_save = None  # also called by save(): the memory timeline travels with the figures

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / ".stack.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "stack.json")
        if self.on_save:
            self.on_save()

    def stage(self, name: str, fn, need_s: float = 0.0):
        """Run fn(record) unless the budget is short; errors are recorded, never raised."""
        record: dict = {}
        self.data["stages"][name] = record
        if self.left() < need_s:
            record["skipped"] = f"{self.left():.0f} s left, needs {need_s:.0f} s"
            print(f"[skip] {name}: {record['skipped']}", flush=True)
            self.save()
            return None
        started = time.monotonic()
        print(f"[stage] {name} ({self.left():.0f} s of budget left)", flush=True)
        try:
            return fn(record)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-3000:]
            print(f"[error] {name}: {record['error']}", flush=True)
            return None
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)
            self.save()


# --- GPU memory (NVML) or, on a CPU, the daemons' resident memory ------------------------------------

class MemorySampler(threading.Thread):
    """Samples used memory every `period` s: the card's (NVML) or the RSS of a process tree (CPU runs).
    Keeps the peak per phase, per-process peaks and a 1-second timeline."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True, name="memory-sampler")
        self.period, self.phase, self.root_pid = period, "idle", None
        self.peaks: dict[str, dict] = {}
        self.per_pid: dict[int, dict] = {}
        self.timeline: list[list] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv, self._handle, self.source = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), "nvml"
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.card = {"name": name.decode() if isinstance(name, bytes) else name,
                         "total_gib": round(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total / GIB, 2),
                         "driver": _text(pynvml.nvmlSystemGetDriverVersion())}
        except Exception as exc:  # no driver: a CPU run
            self._nv, self.source, self.card = None, "rss", {"nvml": f"unavailable ({exc})"}

    def _read(self) -> tuple[int, dict[int, int]]:
        if self._nv is not None:
            used = self._nv.nvmlDeviceGetMemoryInfo(self._handle).used
            try:
                procs = self._nv.nvmlDeviceGetComputeRunningProcesses(self._handle)
                per = {p.pid: int(p.usedGpuMemory or 0) for p in procs}
            except Exception:
                per = {}
            return int(used), per
        per = {pid: _rss(pid) for pid in _tree(self.root_pid)} if self.root_pid else {}
        return sum(per.values()), per

    def run(self) -> None:
        last_second = None
        while not self._stop.wait(self.period):
            try:
                used, per = self._read()
            except Exception:
                continue
            now = time.time()
            with self._lock:
                peak = self.peaks.setdefault(self.phase, {"bytes": 0})
                if used > peak["bytes"]:
                    peak.update(bytes=used, gib=round(used / GIB, 2), at=round(now, 1))
                for pid, nbytes in per.items():
                    entry = self.per_pid.setdefault(pid, {"max_bytes": 0, "series": [(now, nbytes)]})
                    entry["max_bytes"] = max(entry["max_bytes"], nbytes)
                    if abs(nbytes - entry["series"][-1][1]) > 32 * 1024**2 and len(entry["series"]) < 20000:
                        entry["series"].append((now, nbytes))  # changes only: a whole run fits
                second = int(now)
                if second != last_second:
                    self.timeline.append([round(now, 1), self.phase, round(used / GIB, 2)])
                    last_second = second
                elif used / GIB > self.timeline[-1][2]:
                    self.timeline[-1][2] = round(used / GIB, 2)

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def current(self) -> int:
        return self._read()[0]

    def time_to_reach(self, pid: int, nbytes: int, since: float) -> float | None:
        """Seconds from `since` until process `pid` first held `nbytes` (None if it never did)."""
        with self._lock:
            series = list(self.per_pid.get(pid, {}).get("series", ()))
        return next((round(t - since, 1) for t, b in series if b >= nbytes), None)

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict:
        with self._lock:
            return {"source": self.source, "card": self.card, "period_s": self.period, "peaks": dict(self.peaks),
                    "per_pid_max_gib": {pid: round(e["max_bytes"] / GIB, 2) for pid, e in self.per_pid.items()},
                    "timeline": list(self.timeline)}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


# --- services: redis-server, Storage stub, callback receiver --------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, exe: str, lib_dir: str | None, workdir: Path):
        self.port, self.workdir = free_port(), workdir
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if lib_dir:  # the carried shared libraries a stock image may lack (liblzf, libjemalloc, ...)
            env["LD_LIBRARY_PATH"] = f"{lib_dir}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(workdir / "redis.log")], env=env)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client, deadline = self.client(), time.monotonic() + 15
        while True:  # readiness poll of the server we just started
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit {self.proc.poll()})")
                time.sleep(0.05)
        self.version = client.info("server")["redis_version"]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# --- today's payloads -----------------------------------------------------------------------------------

def _payload(name: str) -> dict:
    job = json.loads((PAYLOADS / name).read_text())
    job_id = str(uuid.uuid4())
    job.update(id=job_id, job_id=job_id)
    return job


def sdxl_job(images: int, resolution: str, steps: int, seed: int) -> dict:
    job = _payload("02_sdxl_high_6_images_negative_seed.json" if images > 1 else "01_sdxl_fast_1_image.json")
    job["config"].update(num_images=images, resolution=resolution, num_inference_steps=steps, seed=seed)
    w, h = (int(v) for v in resolution.split("x"))
    job["metadata"].update(num_inference_steps=steps, aspect_ratio="1:1" if w == h else job["metadata"]["aspect_ratio"])
    return job


def wan_job(duration: float, steps: int, seed: int) -> dict:
    job = _payload("06_wan_video_fast_t2v.json")
    job["config"].update(num_inference_steps=steps, seed=seed)
    job["metadata"].update(duration=duration, aspect_ratio="9:16", num_inference_steps=steps)  # 480x832
    return job


def chat_job(max_tokens: int, deadline_s: float) -> dict:
    job_id = str(uuid.uuid4())
    request = {**json.loads((PAYLOADS / "22_chat_request.json").read_text()), "max_tokens": max_tokens}
    return {"id": job_id, "type": "chat", "reply_key": f"chat:reply:{job_id}",
            "deadline_ms": int((time.time() + deadline_s) * 1000), "request": request}


def encode(job: dict, encoding: int) -> str:
    """Contract section 1: a JSON object, an array holding the JSON string (REST RPUSH), an array holding the object."""
    text = json.dumps(job)
    return [text, json.dumps([text]), json.dumps([job])][encoding % 3]


# --- jobs in flight: pushes, callbacks, replies ----------------------------------------------------------

class Tracker:
    """When each job was pushed and when its verified callback or reply arrived."""

    def __init__(self, r: redis.Redis, receiver: CallbackReceiver, storage: StorageStub):
        self.r, self.receiver, self.storage = r, receiver, storage
        self.jobs: dict[str, dict] = {}
        self.replies: dict[str, tuple[float, dict]] = {}
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_replies, daemon=True, name="chat-replies")
        self._reader.start()

    def push(self, family: str, job: dict, encoding: int = 0) -> str:
        raw = json.dumps(job) if family == "chat" else encode(job, encoding)
        self.jobs[job["id"]] = {"family": family, "job": job, "pushed": time.monotonic(), "pushed_wall": time.time()}
        self.r.rpush(QUEUES[family], raw)
        return job["id"]

    def _read_replies(self) -> None:
        r = redis.Redis(connection_pool=self.r.connection_pool)
        while not self._stop.is_set():
            keys = [j["job"]["reply_key"] for j in list(self.jobs.values())
                    if j["family"] == "chat" and j["job"]["reply_key"] not in self.replies]
            if not keys:
                time.sleep(0.1)
                continue
            try:
                got = r.blpop(keys, timeout=1)
            except redis.RedisError:
                time.sleep(0.5)
                continue
            if got:
                self.replies[got[0].decode()] = (time.monotonic(), json.loads(got[1]))

    def final(self, job_id: str) -> tuple[float, dict] | None:
        """(arrival, body) of the job's terminal callback or reply, None while it runs."""
        entry = self.jobs[job_id]
        if entry["family"] == "chat":
            return self.replies.get(entry["job"]["reply_key"])
        for body in list(self.receiver.received):
            if body["job_id"] == job_id and body["status"] in TERMINAL:
                return self.receiver.arrivals(job_id, body["status"])[0], body
        return None

    def wait_any(self, ids: list[str], deadline: float) -> bool:
        return self.wait(ids, deadline, done=any)

    def wait(self, ids: list[str], deadline: float, done=all) -> bool:
        """Poll until done(final results of ids) (the stub server gives no other signal) or the deadline."""
        while time.monotonic() < deadline:
            if done(self.final(i) for i in ids):
                return True
            time.sleep(0.1)
        return False

    def result(self, job_id: str) -> dict:
        entry, done = self.jobs[job_id], self.final(job_id)
        out = {"id": job_id, "family": entry["family"]}
        if done is None:
            return {**out, "status": "missing"}
        arrived, body = done
        out["e2e_s"] = round(arrived - entry["pushed"], 3)
        if entry["family"] == "chat":
            info = body.get("model_info") or {}
            return {**out, "status": "completed" if body.get("success") else "failed",
                    "generation_s": body.get("generation_time"), "tokens": body.get("tokens_generated"),
                    "prompt_tokens": info.get("prompt_tokens"), "error": body.get("error") or body.get("reason")}
        meta = body.get("metadata") or {}
        out.update(status=body["status"], generation_s=meta.get("generation_time"), error=body.get("error_message"))
        out.update(self._stored(entry, body))
        out.update(self._job_meta(job_id))
        out.update(self._timeline(entry, arrived))
        return out

    def _timeline(self, entry: dict, arrived: float) -> dict:
        """Where a job's time outside the pipeline went, from rq's own timestamps (wall clock, same host):
        push -> rq job made from the raw payload -> started -> ended (callback sent) -> callback arrived."""
        try:
            fields = self.r.hmget(f"rq:job:{entry['job']['id']}", "enqueued_at", "started_at", "ended_at")
            enq, start, end = (datetime.fromisoformat(f.decode().replace("Z", "+00:00")).timestamp() for f in fields)
        except Exception:  # expired, or a field missing: no timeline, the other figures stand
            return {}
        pushed = entry["pushed_wall"]
        return {"timeline_s": {"to_rq_job": round(enq - pushed, 4), "queued": round(start - enq, 4),
                               "in_job": round(end - start, 4),
                               "callback_after_end": round(pushed + (arrived - entry["pushed"]) - end, 4)}}

    def _stored(self, entry: dict, body: dict) -> dict:
        """Every asset and thumbnail of a completed job is in the bucket, with the right type."""
        objects = dict(self.storage.objects)
        want = {"image": "image/png", "video": "video/mp4"}
        nbytes, missing = 0, []
        for asset in body.get("assets") or []:
            for path, ctype in ((asset["url"], want[asset["type"]]), (asset["thumbnail_url"], "image/webp")):
                found = objects.get((BUCKET, path))
                if found is None or found[1] != ctype or not found[0]:
                    missing.append(path)
                else:
                    nbytes += len(found[0])
        return {"assets": len(body.get("assets") or []), "bytes_stored": nbytes, "missing_objects": missing}

    def _job_meta(self, job_id: str) -> dict:
        try:
            raw = self.r.hget(f"rq:job:{job_id}", "meta")
            meta = json.loads(raw) if raw else {}
        except Exception:
            return {}
        return {k: meta[k] for k in ("vram_wait_s", "weights_reload_s") if k in meta}

    def close(self) -> None:
        self._stop.set()
        self._reader.join(5)


# --- the daemons' logs ----------------------------------------------------------------------------------

# searched, not matched: a progress bar without a newline may precede the stamp on its line
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) [A-Z]+ ")
_STARTED = re.compile(r"started (\w+)@gpu\d+ \(pid (\d+)\)")
_LOADING = re.compile(r": loading the (\w+) pipeline")
_WEIGHTS = re.compile(r"(?i)\b(sdxl|wan|chat|qwen)\b.*\bweights\b.*\bin ([\d.]+) ?s\b")
_READY = re.compile(r": (\w+) pipeline ready in ([\d.]+) ?s")
_MOVED = re.compile(r"moved (?:idle )?(\w+) weights (to CPU|back to the GPU) in ([\d.]+)s")
_TROUBLE = re.compile(r"(?i)out of memory|OutOfMemoryError|crash-loops|exited unexpectedly|Traceback")


def parse_log(text: str, t_start: float) -> dict:
    """Per family: when its daemon started and loaded, the load figures it logged, weight moves; trouble lines."""
    fams: dict[str, dict] = {f: {} for f in FAMILIES}
    trouble, pids = [], {}
    for line in text.splitlines():
        m = _STAMP.search(line)
        at = round(datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - t_start, 2) if m else None
        if (s := _STARTED.search(line)) and s[1] in fams:
            pids[int(s[2])] = s[1]
            fams[s[1]].setdefault("process_started_at_s", at)
            fams[s[1]].setdefault("pids", []).append(int(s[2]))
        elif (s := _LOADING.search(line)) and s[1] in fams:
            fams[s[1]].setdefault("loading_at_s", at)
        elif (s := _READY.search(line)) and s[1] in fams:
            fams[s[1]].setdefault("ready_logged_s", float(s[2]))
            fams[s[1]].setdefault("ready_at_s", at)
        elif (s := _MOVED.search(line)) and s[1] in fams:
            key = "offloads" if s[2] == "to CPU" else "reloads"
            fams[s[1]].setdefault(key, []).append(float(s[3]))
        elif (s := _WEIGHTS.search(line)) and "moved" not in line:
            family = {"qwen": "chat"}.get(s[1].lower(), s[1].lower())
            fams[family].setdefault("weights_on_gpu_logged_s", float(s[2]))
            fams[family].setdefault("weights_at_s", at)
        if _TROUBLE.search(line):
            trouble.append(line[:300])
    oom = [t for t in trouble if re.search(r"(?i)out of memory|OutOfMemoryError", t)]
    return {"families": fams, "pids": pids, "oom_lines": oom[:10], "trouble_lines": trouble[:20],
            "trouble_count": len(trouble)}


def cap_file(path: Path, limit: int = LOG_CAP) -> None:
    """Keep the head and the tail of a file larger than `limit`."""
    if not path.exists() or path.stat().st_size <= limit:
        return
    data = path.read_bytes()
    head, tail = data[: limit // 4], data[-(limit * 3 // 4):]
    path.write_bytes(head + f"\n[... {len(data) - len(head) - len(tail)} bytes cut ...]\n".encode() + tail)


# --- stages -----------------------------------------------------------------------------------------------

def stage_build(args, record: dict) -> dict:
    """bench.full_models in a child process: this process never initialises CUDA."""
    tmp = Path(args.work) / "build.json"
    cmd = [sys.executable, "-m", "bench.full_models", "--out", args.models, "--json", str(tmp)]
    cmd += ["--tiny", "--device", "cpu"] if args.tiny else []
    with open(Path(args.out) / "build.log", "ab") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=quiet_env(dict(os.environ)), stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.build_timeout_s).returncode
    built = json.loads(tmp.read_text()) if tmp.exists() else {}
    record.update(exit_code=code, **built)
    if code != 0 or set(built.get("models", {})) != set(FAMILIES):
        raise RuntimeError(f"model build failed (exit {code}); see build.log")
    if built.get("problems"):
        raise RuntimeError(f"saved configs do not match the loaders: {built['problems']}")
    return built


def pick_models_dir(tiny: bool) -> str:
    """/tmp when its disk holds the models; else a tmpfs that does (then "cold" reads come from RAM)."""
    if tiny:
        return "/tmp/genq-models-tiny"
    for base in ("/tmp", "/dev/shm"):
        if os.path.isdir(base) and shutil.disk_usage(base).free >= FULL_DISK_BYTES:
            return f"{base}/genq-models"
    return "/tmp/genq-models"  # the build says how much is missing


def model_files(models: str) -> dict[str, list[Path]]:
    return {f: sorted(p for p in (Path(models) / FOLDERS[f]).rglob("*") if p.is_file()) for f in FAMILIES}


def drop_page_cache(files: list[Path]) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for path in files:  # clean pages of files no one maps leave the cache with DONTNEED, no privilege needed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise_dontneed"


def read_files(files: list[Path], limit: int | None = None) -> tuple[int, float]:
    """Sequential reads in 64 MiB chunks (at most `limit` bytes): bytes read and seconds."""
    buf, total, t0 = bytearray(64 * 1024**2), 0, time.perf_counter()
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while (limit is None or total < limit) and (n := f.readinto(view)):
                total += n
    return total, time.perf_counter() - t0


def filesystem_of(path: str) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(Path(path).resolve()).startswith(mount) and len(mount) > len(best[0]):
            best = (mount, fstype)
    return f"{best[1]} on {best[0]}"


def stage_coldread(args, record: dict) -> dict:
    files = model_files(args.models)
    record["filesystem"] = filesystem_of(args.models)
    record["method"] = drop_page_cache([p for fs in files.values() for p in fs])
    for family, fs in files.items():
        cold_bytes, cold_s = read_files(fs)
        # the same bytes again, now cached (at most 2 GB of them): a cold read as fast means no eviction
        warm_bytes, warm_s = read_files(fs, limit=2 * 10**9)
        record[family] = {"bytes": cold_bytes, "files": len(fs), "read_s": round(cold_s, 2),
                          "read_gb_s": round(cold_bytes / 1e9 / max(cold_s, 1e-6), 2),
                          "cached_read_gb_s": round(warm_bytes / 1e9 / max(warm_s, 1e-6), 2)}
    big = [record[f] for f in FAMILIES if record[f]["bytes"] > 10**9]
    record["cache_was_cold"] = all(r["read_gb_s"] < r["cached_read_gb_s"] / 1.5 for r in big) if big else None
    record["dropped_again_for_daemons"] = drop_page_cache([p for fs in files.values() for p in fs])
    return record


# --- one scenario: the stack under the orchestrator -------------------------------------------------------

def quiet_env(env: dict) -> dict:
    return {**env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


class Scenario:
    def __init__(self, name: str, args, profile: Profile, run: Run, sampler: MemorySampler,
                 redis_server: RedisServer, storage: StorageStub, receiver: CallbackReceiver):
        self.name, self.args, self.p, self.run, self.sampler = name, args, profile, run, sampler
        self.redis_server, self.storage, self.receiver = redis_server, storage, receiver
        self.r = redis_server.client()
        self.log_path = Path(args.out) / f"orchestrator-{name}.log"
        self.status_path = Path(args.out) / f"status-{name}.txt"
        self.proc: subprocess.Popen | None = None
        self.tracker: Tracker | None = None
        self.seed = 1000
        # the first scenario after coldread starts from disk; later ones find the weights in the cache
        self.page_cache = "warm"
        self.light = False  # a reduced stream (scenarios after the first)

    def env(self) -> dict:
        drop = ("GENQ_", "SUPABASE_", "JOB_CALLBACK", "SDXL_", "WAN_", "QWEN_", "REDIS_URL")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(env_for(Path(self.args.models)))
        env.update({
            "REDIS_URL": self.redis_server.url, "SUPABASE_URL": self.storage.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
            "JOB_CALLBACK_URL": self.receiver.url, "JOB_CALLBACK_SECRET": SECRET, "GENQ_HOST": HOST,
            "GENQ_GRACE_S": "30", "GENQ_ACCEL": "1" if self.args.accel else "0", "PYTHON": sys.executable,
            "GENQ_LOG_LEVEL": "INFO", "HOME": os.environ.get("HOME") or "/tmp",  # startup.sh runs with set -u
        })
        # The chat batching engine (on by default on CUDA) also on the CPU, so that --tiny runs its code;
        # its decode step eager unless --chat-compile (a fresh machine compiles ~1-2 min at start).
        env.update(GENQ_CHAT_BATCH="1", GENQ_CHAT_COMPILE="1" if self.args.chat_compile else "0")
        if self.args.tiny:  # WAN's warm-up at the tiny jobs' 5 frames, not a full 81-frame video on the CPU
            env.update(GENQ_DEVICE="cpu", OMP_NUM_THREADS="2", WAN_WARMUP_FRAMES="5")
        if self.name == "48GB" or self.args.tiny:
            env["GENQ_SIMULATED_GPUS"] = "48GB" if self.name == "48GB" else "80GB"  # CPU: a stand-in card
        if self.name in self.p.warmup:
            w, h, n = self.p.warmup[self.name]
            env.update(SDXL_WARMUP_WIDTH=str(w), SDXL_WARMUP_HEIGHT=str(h), SDXL_WARMUP_IMAGES=str(n))
        return quiet_env(env)

    # --- start and stop ------------------------------------------------------------------------------
    def start(self, record: dict) -> None:
        self.r.flushall()
        self.sampler.set_phase(f"{self.name}:idle")
        time.sleep(1.0)  # one sample of the idle card
        record["used_before_start_gib"] = round(self.sampler.current() / GIB, 2)
        record["page_cache"] = self.page_cache
        env = self.env()
        record["env"] = {k: v for k, v in env.items() if k.startswith(("GENQ_", "SDXL_", "WAN_", "QWEN_"))}
        self.sampler.set_phase(f"{self.name}:startup")
        self.t_start, t0 = time.time(), time.monotonic()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["bash", str(ROOT / "startup.sh")], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.sampler.root_pid = self.proc.pid
        self.tracker = Tracker(self.r, self.receiver, self.storage)
        seen: dict[str, float] = {}
        deadline = t0 + min(self.p.ready_timeout_s, self.run.left() - 30)
        while len(seen) < len(FAMILIES):
            if self.proc.poll() is not None:
                raise RuntimeError(f"startup.sh / orchestrator exited {self.proc.returncode}: {self.log_tail()}")
            if "exited unexpectedly" in self.log_text():  # the orchestrator would retry; the budget cannot
                raise RuntimeError(f"a daemon exited during start-up: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemons not all ready after {time.monotonic() - t0:.0f} s "
                                   f"(ready: {sorted(seen)}): {self.log_tail()}")
            for key in self.r.smembers("rq:workers"):
                family = key.decode().removeprefix("rq:worker:").split("-", 1)[0]
                seen.setdefault(family, round(time.monotonic() - t0, 1))
            time.sleep(0.25)
        record["first_rq_worker_s"] = seen
        record["all_ready_s"] = max(seen.values())
        record["cold_start"] = self.cold_start(parse_log(self.log_text(), self.t_start))

    def cold_start(self, parsed: dict) -> dict:
        """Per family, from the logs (and NVML per process where its pids match this namespace's)."""
        from memory import table

        parts = table()["parts"]
        gpu_weights = {"sdxl": ["sdxl.unet", "sdxl.text_encoders", "sdxl.vae"], "wan": ["wan.transformer", "wan.vae"],
                       "chat": ["qwen_instruct"]}
        out = {}
        for family, info in parsed["families"].items():
            row = dict(info)
            if self.sampler.source == "nvml":
                need = 0.9 * sum(parts[p]["bytes"] for p in gpu_weights[family])
                for pid in info.get("pids", [])[:1]:
                    row["nvml_time_to_90pct_weights_s"] = self.sampler.time_to_reach(pid, need, self.t_start)
            out[family] = row
        return out

    def stop(self, record: dict) -> None:
        if self.proc is None:
            return
        self.sampler.set_phase(f"{self.name}:drain")
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # startup.sh exec'd the orchestrator: this pid is it
            try:
                self.proc.wait(min(45, max(5, self.run.left() - 5)))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                for pid in parse_log(self.log_text(), self.t_start)["pids"]:  # the daemons it had started
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
        record["drain"] = {"exit_code": self.proc.returncode, "seconds": round(time.monotonic() - t0, 1)}
        if self.tracker:
            self.tracker.close()
        parsed = parse_log(self.log_text(), self.t_start)
        record["log"] = {k: parsed[k] for k in ("oom_lines", "trouble_lines", "trouble_count")}
        record["weight_moves"] = {f: {k: v for k, v in info.items() if k in ("offloads", "reloads")}
                                  for f, info in parsed["families"].items()}
        self.log.close()
        cap_file(self.log_path)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 1500) -> str:
        return self.log_text()[-n:]

    # --- work ------------------------------------------------------------------------------------------
    def _seed(self) -> int:
        self.seed += 7
        return self.seed

    def _wait(self, ids: list[str], timeout: float) -> bool:
        return self.tracker.wait(ids, time.monotonic() + max(5.0, min(timeout, self.run.left() - 45)))

    def stream(self, record: dict) -> None:
        """The mixed stream, pushed at once in an interleaved order, then waited for."""
        p, push = self.p, self.tracker.push
        self.sampler.set_phase(f"{self.name}:stream")
        # later scenarios get half the stream: they run on what is left of the budget
        n6, n1, videos, n_chat = ((p.sdxl6, p.sdxl1, p.videos, p.chats) if not self.light else
                                  (max(1, p.sdxl6 // 2), max(1, p.sdxl1 // 2), p.videos[:1], max(1, p.chats // 2)))
        work = [("sdxl", sdxl_job(6, p.sdxl_res, p.sdxl6_steps, self._seed())) for _ in range(n6)]
        work += [("sdxl", sdxl_job(1, p.sdxl_res, p.sdxl1_steps, self._seed())) for _ in range(n1)]
        work += [("wan", wan_job(d, steps, self._seed())) for d, steps in videos]
        chats = [("chat", chat_job(p.chat_tokens, deadline_s=600)) for _ in range(n_chat)]
        order = _interleave(work, chats)
        t0 = time.monotonic()
        ids = [push(family, job, encoding=i) for i, (family, job) in enumerate(order)]
        record["pushed"] = {"sdxl_6_images": n6, "sdxl_1_image": n1, "videos_duration_steps": list(videos),
                            "chats": n_chat, "chat_max_tokens": p.chat_tokens, "resolution": p.sdxl_res,
                            "steps_6_images": p.sdxl6_steps, "steps_1_image": p.sdxl1_steps,
                            "video_size": "480x832 (9:16), 16 fps: 5 s = 81 frames, 2 s = 33 frames"}
        record["wait_limit_s"] = round(min(p.stream_timeout_s, self.run.left() - 45), 1)
        record["wait_cut_by_budget"] = self.run.left() - 45 < p.stream_timeout_s
        self.tracker.wait_any(ids, time.monotonic() + min(20, p.stream_timeout_s / 10))  # mid-stream
        record["status_taken_at_s"] = round(time.monotonic() - t0, 1)
        self.take_status()
        all_done = self._wait(ids, p.stream_timeout_s)
        record["wall_s"] = round(time.monotonic() - t0, 1)
        results = [self.tracker.result(i) for i in ids]
        record["jobs"] = results
        record["checks"] = self.checks(results, all_done)
        record["per_family"] = _per_family(results)

    def checks(self, results: list[dict], all_done: bool) -> dict:
        bad = [r for r in results if r["status"] != "completed" or r.get("missing_objects")]
        rejected = [s for s in list(self.receiver.statuses) if s != 200]
        oom = parse_log(self.log_text(), self.t_start)["oom_lines"]
        queues = {q: self.r.llen(q) for q in QUEUES.values()}
        return {"all_completed": all_done and not bad, "not_completed": [(r["id"], r["status"], r.get("error"))
                                                                         for r in bad][:10],
                "no_oom_in_logs": not oom, "callback_http_statuses_not_200": rejected[:10],
                "callbacks_verified": not rejected,
                "bytes_stored": sum(r.get("bytes_stored", 0) for r in results),
                "objects_in_bucket": len(self.storage.objects), "queues_left": queues}

    def take_status(self) -> None:
        env = self.env()
        with open(self.status_path, "a") as f:
            for extra in ([], ["--json"]):
                try:
                    out = subprocess.run([sys.executable, "-m", "orchestrator", "status", *extra], cwd=ROOT, env=env,
                                         capture_output=True, text=True, timeout=60)
                    text = out.stdout if len(out.stdout) < 200_000 else out.stdout[:200_000] + "\n[cut]\n"
                    f.write(f"$ python -m orchestrator status {' '.join(extra)}  (exit {out.returncode})\n{text}"
                            f"{out.stderr[-2000:]}\n")
                except subprocess.TimeoutExpired:
                    f.write("status timed out\n")

    def overhead(self, record: dict) -> None:
        """1-image SDXL jobs one at a time: push -> verified callback, vs the pipeline call alone."""
        p = self.p
        self.sampler.set_phase(f"{self.name}:overhead")
        warm = self.tracker.push("sdxl", sdxl_job(1, p.sdxl_res, p.sdxl1_steps, self._seed()))
        self._wait([warm], 120)
        rows = []
        for _ in range(p.overhead_jobs):
            if self.run.left() < 50:
                record["cut_short"] = True
                break
            job_id = self.tracker.push("sdxl", sdxl_job(1, p.sdxl_res, p.sdxl1_steps, self._seed()))
            self._wait([job_id], 120)
            rows.append(self.tracker.result(job_id))
        done = [r for r in rows if r["status"] == "completed"]
        e2e, gen = [r["e2e_s"] for r in done], [r["generation_s"] for r in done]
        record.update(shape=f"{p.sdxl_res} x1, {p.sdxl1_steps} steps", jobs=rows, completed=len(done))
        if done:
            record.update(e2e_median_s=round(statistics.median(e2e), 3), generation_median_s=round(statistics.median(gen), 3),
                          overhead_median_s=round(statistics.median(a - b for a, b in zip(e2e, gen)), 3),
                          ratio_median=round(statistics.median(e2e) / statistics.median(gen), 3),
                          ratio_total=round(sum(e2e) / sum(gen), 3))
            lines = [r["timeline_s"] for r in done if "timeline_s" in r]
            if lines:  # in_job minus generation is the job's own work outside the pipeline: encode, upload, callback
                record["timeline_median_s"] = {k: round(statistics.median(t[k] for t in lines), 4) for k in lines[0]}
                record["timeline_median_s"]["in_job_outside_pipeline"] = round(statistics.median(
                    r["timeline_s"]["in_job"] - r["generation_s"] for r in done if "timeline_s" in r), 4)

    def overlap(self, record: dict) -> None:
        """One job alone, then `overlap_jobs` pushed at once: wall time vs the sum of generation times."""
        p = self.p
        self.sampler.set_phase(f"{self.name}:overlap")

        def job() -> dict:
            return sdxl_job(p.overlap_images, p.sdxl_res, p.overlap_steps, self._seed())

        alone = self.tracker.push("sdxl", job())
        self._wait([alone], 180)
        single = self.tracker.result(alone)
        t0 = time.monotonic()
        ids = [self.tracker.push("sdxl", job()) for _ in range(p.overlap_jobs)]
        self._wait(ids, 300)
        rows = [self.tracker.result(i) for i in ids]
        record.update(shape=f"{p.sdxl_res} x{p.overlap_images}, {p.overlap_steps} steps", single=single, jobs=rows)
        if all(r["status"] == "completed" for r in rows + [single]):
            wall = max(self.tracker.final(i)[0] for i in ids) - t0
            gen = sum(r["generation_s"] for r in rows)
            after_gpu = single["e2e_s"] - single["generation_s"]  # encode, upload, callback, intake of one job
            record.update(wall_s=round(wall, 3), sum_generation_s=round(gen, 3), ratio=round(wall / gen, 3),
                          single_after_gpu_s=round(after_gpu, 3),
                          serial_estimate_s=round(gen + p.overlap_jobs * after_gpu, 3),
                          overlapped_estimate_s=round(gen + after_gpu, 3))


def _interleave(work: list, chats: list) -> list:
    out, k = [], max(1, len(chats) // max(1, len(work)))
    for i, item in enumerate(work):
        out.append(item)
        out += chats[i * k:(i + 1) * k]
    return out + chats[len(work) * k:]


def _per_family(results: list[dict]) -> dict:
    out = {}
    for family in FAMILIES:
        rows = [r for r in results if r["family"] == family and r["status"] == "completed"]
        if rows:
            out[family] = {"completed": len(rows), "e2e_max_s": max(r["e2e_s"] for r in rows),
                           "generation_median_s": round(statistics.median(r["generation_s"] for r in rows), 3)}
    return out


def run_scenario(name: str, args, profile: Profile, run: Run, sampler: MemorySampler, services, record: dict,
                 cold: bool = False, light: bool = False) -> None:
    sc = Scenario(name, args, profile, run, sampler, *services)
    if cold:
        sc.page_cache = f"dropped ({run.data['stages']['coldread']['dropped_again_for_daemons']})"
    sc.light = light
    try:
        for part, fn, need in (("startup", sc.start, 0), ("stream", sc.stream, 30),
                               ("overhead", sc.overhead, profile.need_overhead_s),
                               ("overlap", sc.overlap, profile.need_overlap_s)):
            if part in args.skip.split(","):
                continue
            sub = record.setdefault(part, {})
            if run.left() < need + 40:
                sub["skipped"] = f"{run.left():.0f} s left"
                continue
            t0 = time.monotonic()
            print(f"[{name}] {part} ({run.left():.0f} s of budget left)", flush=True)
            try:
                fn(sub)
            except Exception as exc:
                sub["error"] = f"{type(exc).__name__}: {exc}"[:3000]
                sub["traceback"] = traceback.format_exc()[-3000:]
                print(f"[{name}] {part} error: {sub['error'][:500]}", flush=True)
            finally:
                sub["seconds"] = round(time.monotonic() - t0, 1)
                record["memory_peaks"] = {k: v for k, v in sampler.snapshot()["peaks"].items() if k.startswith(name)}
                run.save()
            if part == "startup" and "error" in sub:
                break
    finally:
        sc.stop(record)
        peaks = {k: v for k, v in sampler.snapshot()["peaks"].items() if k.startswith(name)}
        record["memory_peaks"] = peaks
        top = max((v["bytes"] for k, v in peaks.items() if not k.endswith(":idle")), default=0)
        record["peak_used_gib"] = round(top / GIB, 2)
        idle = record.get("startup", {}).get("used_before_start_gib")
        if idle is not None:
            record["peak_minus_idle_gib"] = round(top / GIB - idle, 2)
        if name == "48GB" and sampler.source == "nvml":
            record["peak_under_48gib"] = top < 48 * GIB
        run.save()


# --- main --------------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "diffusers", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface_hub",
                 "numpy", "pillow", "rq", "redis", "supabase", "pydantic", "pydantic-settings", "av", "nvidia-ml-py"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def summary(run: Run) -> str:
    d, lines = run.data, []
    b = d["stages"].get("build", {})
    if b.get("models"):
        lines.append("build: " + ", ".join(f"{f} {m['bytes'] / 1e9:.2f} GB in {m.get('build_s', 0) + m.get('save_s', 0):.0f}s"
                                           for f, m in b["models"].items()))
    c = d["stages"].get("coldread", {})
    if "sdxl" in c:
        lines.append(f"cold read ({c['method']}, {c['filesystem']}, cold={c['cache_was_cold']}): "
                     + ", ".join(f"{f} {c[f]['read_s']}s ({c[f]['read_gb_s']} GB/s)" for f in FAMILIES))
    for name, sc in d.get("scenarios", {}).items():
        st = sc.get("startup", {})
        cs = st.get("cold_start", {})
        lines.append(f"[{name}] ready in {st.get('all_ready_s')}s (page cache {st.get('page_cache')}); weights on GPU (logged): "
                     + ", ".join(f"{f} {cs.get(f, {}).get('weights_on_gpu_logged_s')}s" for f in FAMILIES)
                     + "; ready (logged): " + ", ".join(f"{f} {cs.get(f, {}).get('ready_logged_s')}s" for f in FAMILIES))
        if err := st.get("error") or sc.get("error"):
            lines.append(f"[{name}] ERROR {err[:300]}")
        s = sc.get("stream", {})
        if "checks" in s:
            ch = s["checks"]
            lines.append(f"[{name}] stream {s['wall_s']}s: all_completed={ch['all_completed']} no_oom={ch['no_oom_in_logs']} "
                         f"callbacks_verified={ch['callbacks_verified']} stored={ch['bytes_stored'] / 1e6:.1f} MB "
                         f"{json.dumps(s.get('per_family'))}")
        o = sc.get("overhead", {})
        if "ratio_median" in o:
            lines.append(f"[{name}] overhead: e2e {o['e2e_median_s']}s vs pipeline {o['generation_median_s']}s "
                         f"= {o['ratio_median']}x (median of {o['completed']})")
        v = sc.get("overlap", {})
        if "ratio" in v:
            lines.append(f"[{name}] overlap: {len(v['jobs'])} jobs wall {v['wall_s']}s vs sum(generation) "
                         f"{v['sum_generation_s']}s = {v['ratio']}x (serial estimate {v['serial_estimate_s']}s)")
        lines.append(f"[{name}] peak used memory ({d.get('memory_source')}) {sc.get('peak_used_gib')} GiB "
                     f"({sc.get('peak_minus_idle_gib')} over idle)"
                     + (f", under 48 GiB: {sc['peak_under_48gib']}" if "peak_under_48gib" in sc else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on this CPU, same code path")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "stack"))
    ap.add_argument("--work", default="/tmp/genq-stack", help="scratch: redis dir, build json")
    ap.add_argument("--models", default=None, help="model folders (default /tmp/genq-models[-tiny])")
    ap.add_argument("--budget-s", type=float, default=None, help="wall budget (default 540, tiny 170)")
    ap.add_argument("--build-timeout-s", type=float, default=300)
    ap.add_argument("--scenarios", default="48GB,full")
    ap.add_argument("--skip", default="", help="comma list of: coldread, stream, overhead, overlap")
    ap.add_argument("--no-accel", dest="accel", action="store_false", help="GENQ_ACCEL=0 (the table assumes 1)")
    ap.add_argument("--chat-compile", action="store_true", help="GENQ_CHAT_COMPILE=1 (production's default on CUDA)")
    ap.add_argument("--redis-server", default=os.environ.get("GENQ_REDIS_SERVER") or shutil.which("redis-server"))
    ap.add_argument("--redis-lib", default=os.environ.get("GENQ_REDIS_LIB"), help="LD_LIBRARY_PATH for redis-server")
    args = ap.parse_args()
    args.models = args.models or pick_models_dir(args.tiny)
    profile = TINY if args.tiny else FULL
    run = Run(Path(args.out), args.budget_s or (170 if args.tiny else 540))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    sampler = MemorySampler()
    sampler.start()
    run.data.update(tiny=args.tiny, versions=versions(), card=sampler.card, memory_source=sampler.source,
                    models_dir=args.models, disk_free_gb={d: round(shutil.disk_usage(d).free / 1e9, 1)
                                                          for d in ("/tmp", "/dev/shm") if os.path.isdir(d)},
                    profile=profile.__dict__, accel=args.accel, chat_compile=args.chat_compile, scenarios={})
    run.save()

    def save_memory() -> None:
        (Path(args.out) / "memory.json").write_text(json.dumps(sampler.snapshot(), default=str))

    run.on_save = save_memory

    services = []
    try:
        if run.stage("build", lambda rec: stage_build(args, rec)) is None:
            return 1
        if "coldread" not in args.skip:
            run.stage("coldread", lambda rec: stage_coldread(args, rec), need_s=profile.need_scenario_s + 60)

        def start_services(record: dict) -> list:
            if not args.redis_server:
                raise RuntimeError("no redis-server: put one on PATH or pass --redis-server")
            services[:] = [RedisServer(args.redis_server, args.redis_lib, Path(args.work) / "redis"),
                           StorageStub(service_key=SERVICE_KEY).start(), CallbackReceiver(SECRET, SERVICE_KEY).start()]
            record.update(redis_version=services[0].version, redis_server=args.redis_server, storage=services[1].url,
                          callback=services[2].url)
            return services

        if run.stage("services", start_services) is None:
            return 1
        for i, name in enumerate(filter(None, args.scenarios.split(","))):
            record = run.data["scenarios"].setdefault(name, {})
            if i > 0 and run.left() < profile.need_scenario_s:
                record["skipped"] = f"{run.left():.0f} s left, needs {profile.need_scenario_s:.0f} s"
                continue
            cold = i == 0 and run.data["stages"].get("coldread", {}).get("dropped_again_for_daemons")
            try:
                run_scenario(name, args, profile, run, sampler, services, record, cold=bool(cold), light=i > 0)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"[:3000]
                record["traceback"] = traceback.format_exc()[-3000:]
            save_memory()
            run.save()
    finally:
        sampler.stop()
        save_memory()
        for service in reversed(services):
            service.stop()
        run.save()
    print("SUMMARY\n" + summary(run), flush=True)
    ok = all(sc.get("stream", {}).get("checks", {}).get("all_completed") for sc in run.data["scenarios"].values()
             if "stream" in sc and "skipped" not in sc.get("stream", {}))
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
