"""The process tree: which daemons run on which GPU, restarts with backoff, graceful drain, health.

    python orchestrator.py [run]        validate the plan, start one daemon per family per GPU, supervise
    python orchestrator.py plan         validate and print the plan, start nothing (exit 2 if it cannot fit)
    python orchestrator.py status [--json]   every daemon on every host, from Redis

This process never imports torch: it probes GPUs through NVML only and starts children with
subprocess (fork + exec at once), so no CUDA state is ever copied into a child.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

import memory
from memory import GpuInfo, GpuPlan

log = logging.getLogger("orchestrator")

EXIT_PLAN = 2        # the plan cannot fit: nothing was started
EXIT_CRASH_LOOP = 1  # every daemon crash-looped: let the container supervisor try a fresh start


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore")

    families: str | None = None    # "sdxl,wan,chat"; default: every family with a model path
    placement: str | None = None   # "sdxl:0,wan:0,chat:1"; default: every family on every GPU where it fits
    grace_s: float = Field(120.0, ge=0)  # after SIGTERM, how long running jobs may take to finish
    # {python}, {family} and {gpu} are filled in; tests put a trivial child here
    consumer_command: str = "{python} -m consumers {family}"
    restart_base_s: float = Field(1.0, gt=0)
    restart_max_s: float = Field(60.0, gt=0)
    crash_loop_restarts: int = Field(5, ge=0)  # failures in a row (without a stable run) before giving up
    stable_after_s: float = Field(120.0, gt=0)  # a run this long resets the failure count
    status_interval_s: float = Field(5.0, gt=0)


class PlanError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("the placement cannot work:\n  " + "\n  ".join(problems))
        self.problems = problems


# --- planning --------------------------------------------------------------------------------------
def _families(settings, osettings: OrchestratorSettings) -> list[str]:
    configured = [f for f in memory.FAMILIES if settings.model_path(f)]
    if not osettings.families:
        return configured
    wanted = [f.strip() for f in osettings.families.split(",") if f.strip()]
    problems = [f"GENQ_FAMILIES: unknown family {f!r} (known: {', '.join(memory.FAMILIES)})"
                for f in wanted if f not in memory.FAMILIES]
    problems += [f"GENQ_FAMILIES names {f} but no model path is set for it" for f in wanted
                 if f in memory.FAMILIES and f not in configured]
    if problems:
        raise PlanError(problems)
    return wanted


def _parse_placement(text: str, families: list[str], gpus: dict[int, GpuInfo]) -> dict[int, list[str]]:
    placed: dict[int, list[str]] = {i: [] for i in gpus}
    problems = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        family, _, index = item.partition(":")
        if family not in families:
            problems.append(f"GENQ_PLACEMENT {item!r}: {family!r} is not a served family ({', '.join(families)})")
        elif not index.isdigit() or int(index) not in gpus:
            problems.append(f"GENQ_PLACEMENT {item!r}: no visible GPU {index!r} (visible: {sorted(gpus)})")
        elif family in placed[int(index)]:
            problems.append(f"GENQ_PLACEMENT {item!r}: listed twice")
        else:
            placed[int(index)].append(family)
    if problems:
        raise PlanError(problems)
    return placed


def _default_placement(families: list[str], gpus: dict[int, GpuInfo], settings) -> dict[int, list[str]]:
    placed: dict[int, list[str]] = {}
    for index, gpu in gpus.items():
        placed[index] = []
        for family in families:
            if not memory.check_card(GpuPlan(gpu, tuple(placed[index] + [family])), settings).errors:
                placed[index].append(family)
    return placed


def build_plan(settings, osettings: OrchestratorSettings, gpus: list[GpuInfo]) -> list[memory.CardCheck]:
    """Every card that gets daemons, checked against memory.py; PlanError says precisely why not."""
    families = _families(settings, osettings)
    if not families:
        raise PlanError(["no family to serve: set SDXL_MODEL_PATH, WAN_MODEL_PATH / WAN_VACE_MODEL_PATH or "
                         "QWEN_INSTRUCT_MODEL_PATH / QWEN_BASE_MODEL_PATH (\"tiny\" for random test models)"])
    if not gpus:
        raise PlanError(["no GPU visible (NVML found none; set GENQ_SIMULATED_GPUS=48GB to simulate one)"])
    by_index = {g.index: g for g in gpus}
    placed = (_parse_placement(osettings.placement, families, by_index) if osettings.placement
              else _default_placement(families, by_index, settings))
    checks = [memory.check_card(GpuPlan(by_index[i], tuple(f)), settings) for i, f in placed.items() if f]
    problems = [e for c in checks for e in c.errors]
    served = {f for c in checks for f in c.plan.families}
    for family in families:
        if family not in served and not osettings.placement:
            ref = memory.shape(family, **memory.table()["reference_jobs"][family])
            need = memory.resident_bytes(family, settings) + memory.job_peak_bytes(ref)
            problems.append(f"{family} fits on no visible GPU: its reference job ({memory.describe_shape(ref)}) "
                            f"needs {memory.gib(need)} with its weights; the largest card has "
                            f"{memory.gib(max(g.usable_bytes for g in gpus))} usable")
    if problems:
        raise PlanError(problems)
    return checks


def describe_plan(checks: list[memory.CardCheck]) -> str:
    lines = []
    for c in checks:
        g = c.plan.gpu
        lines.append(f"GPU {g.index} {g.name} ({memory.gib(g.total_bytes)}): {', '.join(c.plan.families)}"
                     + (" [idle models offload to CPU when needed]" if c.offload else ""))
        lines += [f"  note: {n}" for n in c.notes]
    return "\n".join(lines)


# --- supervision -----------------------------------------------------------------------------------
@dataclass
class Child:
    family: str
    gpu: int
    proc: subprocess.Popen | None = None
    state: str = "pending"  # pending | running | backoff | crash_loop | stopped
    failures: int = 0       # in a row, reset by a stable run
    restarts: int = 0
    started_at: float = 0.0
    start_after: float = 0.0
    last_exit: int | None = None

    @property
    def name(self) -> str:
        return f"{self.family}@gpu{self.gpu}"

    def to_json(self) -> dict:
        return {"family": self.family, "gpu": self.gpu, "state": self.state, "pid": self.proc.pid if self.proc else None,
                "restarts": self.restarts, "failures": self.failures, "last_exit": self.last_exit}


@dataclass
class Orchestrator:
    settings: object  # schemas.settings.Settings
    osettings: OrchestratorSettings
    checks: list[memory.CardCheck]
    redis: object = None
    children: list[Child] = field(default_factory=list)
    draining: bool = False
    _wake: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.host = self.settings.worker_host
        self.children = [Child(f, c.plan.gpu.index) for c in self.checks for f in c.plan.families]

    def _command(self, child: Child) -> list[str]:
        return shlex.split(self.osettings.consumer_command.format(
            python=shlex.quote(sys.executable), family=child.family, gpu=child.gpu))

    def _start(self, child: Child) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(child.gpu), CUDA_DEVICE_ORDER="PCI_BUS_ID",
                   GENQ_GPU_INDEX=str(child.gpu), GENQ_SUPERVISOR_PID=str(os.getpid()))
        # Own process group: a Ctrl-C on the terminal reaches only us, and we decide what children get.
        child.proc = subprocess.Popen(self._command(child), env=env, process_group=0)
        child.state, child.started_at = "running", time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def _on_exit(self, child: Child, code: int) -> None:
        child.last_exit, child.proc = code, None
        if self.draining:
            child.state = "stopped"
            log.info("%s stopped (exit %d)", child.name, code)
            return
        ran = time.monotonic() - child.started_at
        child.failures = 1 if ran >= self.osettings.stable_after_s else child.failures + 1
        if child.failures > self.osettings.crash_loop_restarts:
            child.state = "crash_loop"
            log.error("%s crash-loops (%d exits in a row, last code %d): not restarting it", child.name,
                      child.failures, code)
            return
        delay = min(self.osettings.restart_max_s, self.osettings.restart_base_s * 2 ** (child.failures - 1))
        child.state, child.start_after = "backoff", time.monotonic() + delay
        child.restarts += 1
        log.warning("%s exited unexpectedly (code %d after %.0f s); restart in %.1f s", child.name, code, ran, delay)

    def request_stop(self, signum=None, frame=None) -> None:
        self.draining = True
        self._wake.set()

    def _drain(self) -> None:
        log.info("draining: SIGTERM to the daemons, up to %.0f s for running jobs", self.osettings.grace_s)
        running = [c for c in self.children if c.proc]
        for c in running:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.osettings.grace_s
        for c in running:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # the job it was running is left started in rq: the daemons' recovery puts it back in play
                log.warning("%s still running after the grace period: SIGKILL", c.name)
                os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
            self._on_exit(c, c.proc.returncode)
        for c in self.children:
            if c.state in ("pending", "backoff"):
                c.state = "stopped"

    def step(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                self._on_exit(c, c.proc.returncode)
            if c.state in ("pending", "backoff") and now >= c.start_after and not self.draining:
                self._start(c)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        last_status = 0.0
        while not self.draining:
            self.step()
            if all(c.state == "crash_loop" for c in self.children):
                self.publish(final=True)
                log.error("every daemon crash-loops: exiting")
                return EXIT_CRASH_LOOP
            if time.monotonic() - last_status >= self.osettings.status_interval_s:
                self.publish()
                last_status = time.monotonic()
            self._wake.wait(0.2)
        self.publish()
        self._drain()
        self.publish(final=True)
        log.info("all daemons stopped")
        return 0

    def publish(self, final: bool = False) -> None:
        """Status for `status` and the daemons' fits_anywhere check; best effort (Redis may be away)."""
        if self.redis is None:
            return
        ttl = int(self.osettings.status_interval_s * 3) + 5
        key = memory.SUPERVISOR_KEY.format(host=self.host)
        state = "stopped" if final else "draining" if self.draining else "running"
        try:
            with self.redis.pipeline() as p:
                p.hset(key, mapping={"host": self.host, "pid": os.getpid(), "state": state, "heartbeat": time.time(),
                                     "children": json.dumps([c.to_json() for c in self.children])})
                p.expire(key, 3600 if final else ttl)  # a final word stays readable for an hour
                plan_key = memory.PLAN_KEY.format(host=self.host)
                if final:
                    p.delete(plan_key)
                else:
                    p.set(plan_key, json.dumps([c.plan.to_json() for c in self.checks]), ex=ttl)
                p.execute()
        except Exception as exc:
            log.warning("could not publish status to Redis: %s", exc)


# --- status ----------------------------------------------------------------------------------------
def _hashes(redis, pattern: str) -> dict[str, dict[str, str]]:
    out = {}
    for key in redis.scan_iter(match=pattern):
        k = key.decode()
        out[k] = {a.decode(): b.decode() for a, b in redis.hgetall(key).items()}
    return out


def _by_process(workers) -> dict[str, list]:
    """rq workers grouped by daemon process: a daemon runs several (consumers/crew.py)."""
    from consumers.crew import process_of

    groups: dict[str, list] = {}
    for w in sorted(workers, key=lambda w: w.name):
        groups.setdefault(process_of(w.name), []).append(w)
    return groups


def collect_status(redis) -> dict:
    """Everything `status` shows, as data: supervisors, daemons (rq + genq hashes), cards."""
    from rq import Worker

    supervisors = list(_hashes(redis, memory.SUPERVISOR_KEY.format(host="*")).values())
    for s in supervisors:
        s["children"] = json.loads(s.get("children", "[]"))
    daemons = {k.split(":", 2)[2]: v for k, v in _hashes(redis, memory.DAEMON_KEY.format(worker="*")).items()}
    cards = [memory.gpu_snapshot(redis, key.decode()) for key in redis.scan_iter(match=memory.GPU_KEY.format(host="*", gpu="*"))]
    holders = {name: (card, h) for card in cards for name, h in card["holders"].items()}
    rows = []
    for name, crew in _by_process(Worker.all(connection=redis)).items():
        d, (card, h) = daemons.get(name, {}), holders.get(name, (None, {}))
        w = crew[0]
        jobs = [j for j in (x.get_current_job_id() for x in crew) if j]
        states = {x.state for x in crew}
        beat = max((x.last_heartbeat for x in crew if x.last_heartbeat), default=None)
        rows.append({
            "worker": name, "host": w.hostname, "pid": w.pid,
            "state": "busy" if "busy" in states else w.state, "workers": len(crew),
            "family": d.get("family") or name.split("-", 1)[0], "gpu": d.get("gpu"),
            "last_heartbeat": beat.isoformat() if beat else None,
            "current_job": ",".join(jobs) or d.get("current_job") or None,
            "progress": d.get("progress"), "models": d.get("models"),
            "resident_bytes": h.get("resident", int(d.get("resident_bytes") or 0)),
            "reserved_bytes": h.get("reserved", 0), "waiting": h.get("wait"), "asked_to_offload": h.get("ask"),
        })
    return {"supervisors": supervisors, "daemons": rows, "gpus": cards}


def format_status(st: dict) -> str:
    lines = []
    for s in st["supervisors"]:
        lines.append(f"host {s['host']}: orchestrator pid {s['pid']} {s['state']}, "
                     f"heartbeat {time.time() - float(s['heartbeat']):.0f} s ago")
        for c in s["children"]:
            lines.append(f"  {c['family']:5} gpu{c['gpu']}  {c['state']:10} pid {c['pid']}  restarts {c['restarts']}"
                         + (f"  last exit {c['last_exit']}" if c["last_exit"] is not None else ""))
    for card in st["gpus"]:
        lines.append(f"{card['key']}: capacity {memory.gib(card['capacity'])}, resident {memory.gib(card['resident'])}, "
                     f"reserved {memory.gib(card['reserved'])}")
    for d in st["daemons"]:
        lines.append(f"{d['worker']}: {d['family']} gpu {d['gpu']} {d['state']} ({d['workers']} worker(s)), heartbeat {d['last_heartbeat']}, "
                     f"resident {memory.gib(d['resident_bytes'])}, reserved {memory.gib(d['reserved_bytes'])}, "
                     f"models {d['models'] or '-'}, job {d['current_job'] or '-'} {d['progress'] or ''}".rstrip()
                     + (f", waiting for {memory.gib(d['waiting']['need'])}" if d["waiting"] else "")
                     + (", asked to move weights to CPU" if d["asked_to_offload"] else ""))
    return "\n".join(lines) or "nothing registered in Redis"


# --- entry -----------------------------------------------------------------------------------------
def _connect(settings):
    from redis import Redis

    return Redis.from_url(settings.redis_url.get_secret_value(), health_check_interval=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "plan", "status"))
    parser.add_argument("--json", action="store_true", help="status as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("GENQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from schemas.settings import get_settings

    settings = get_settings()
    if args.command == "status":
        st = collect_status(_connect(settings))
        print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
        return 0
    probe = memory.get_probe()
    try:
        checks = build_plan(settings, OrchestratorSettings(), probe.gpus() if probe else [])
    except PlanError as exc:
        log.error("%s", exc)
        return EXIT_PLAN
    if args.command == "plan":
        print(describe_plan(checks))
        return 0
    log.info("plan:\n%s", describe_plan(checks))
    return Orchestrator(settings, OrchestratorSettings(), checks, redis=_connect(settings)).run()


if __name__ == "__main__":
    sys.exit(main())
