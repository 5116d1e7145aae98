"""The daemon's side of GPU memory admission (memory.py): reserve a job's peak before taking it,
hold the reservation while it runs, move idle weights to CPU when another daemon's job needs room,
and publish what this daemon holds for `python -m orchestrator status`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

import memory
from schemas.errors import PayloadError
from schemas.payload import decode

from .cancel import CancelCheck
from .crew import process_of

log = logging.getLogger(__name__)

WAIT_S = 0.5  # between two reservation attempts while a job waits for memory


class NeverFits(PayloadError):
    reason = "never_fits"


class GpuGate:
    def __init__(self, runtime, admission: memory.Admission | None, workers: int = 1):
        self.runtime = runtime
        self.admission = admission
        self.family = runtime.family.name
        self.weights = memory.resident_bytes(self.family, runtime.settings)
        # beyond the weights: CUDA graph pools, which stay on the card even with the weights on the CPU
        self.held = held_beyond_allocations(runtime.pipeline)
        self.on_cpu = False  # weights moved to CPU to make room for another daemon's job
        self.reserved: set[str] = set()
        self.oom = memory.OomPolicy()
        self.workers = workers  # how many workers of this process share the gate (consumers/crew.py)
        self.running: dict[str, tuple[str, Any] | None] = {}
        self.left: set[str] = set()
        self._status_lock = threading.Lock()
        self._move_lock = threading.Lock()
        if admission is not None:
            self._report_resident()
            self._heartbeat = admission.start_heartbeat()

    def _report_resident(self) -> None:
        """What this process holds on the card: its weights (or only the process overhead while they are
        on the CPU) plus the CUDA graph pools, which never move."""
        if self.on_cpu:
            self.admission.set_resident(table_overhead() + self.held, 0)
        else:
            self.admission.set_resident(self.weights + self.held, self._offloadable())

    def _offloadable(self) -> int:
        return self.weights if hasattr(self.runtime.pipeline, "move_to") else 0

    # --- before taking a raw job ----------------------------------------------------------
    def may_take_next(self) -> bool:
        """True when the job at the head of the raw list may be taken now (it fits, or is invalid and
        will fail without touching the GPU). False leaves it queued for this or another GPU."""
        if self.admission is None:
            return True
        raw = self.runtime.redis.lindex(self.runtime.family.raw_queue, 0)
        if raw is None:
            self.admission.withdraw()
            self._offload_if_asked()
            return True
        request = self._request(raw)
        if request is None or self._never_fits(request):
            return True
        decision = self._reserve(request)
        if decision:
            return True
        self.admission.withdraw() if decision.impossible else self._offload_if_asked()
        return False

    def _request(self, raw: bytes) -> Any:
        try:
            return self.runtime.family.adapt(decode(raw, self.runtime.settings.max_payload_bytes))
        except ValueError:
            return None

    def _never_fits(self, request) -> str | None:
        # Without an orchestrator's published plan, this card is the only one we know of.
        fleet = memory.load_fleet(self.runtime.redis, self.family) or [self._this_card()]
        return memory.never_fits_message(request, self.runtime.settings, fleet)

    def _this_card(self) -> memory.GpuPlan:
        adm = self.admission
        card = memory.GpuInfo(self.runtime.settings.gpu_index, "this card",
                              adm.capacity + memory.table()["card_reserve_bytes"])
        return memory.GpuPlan(card, (self.family,))

    def _reserve(self, request) -> memory.Decision | bool:
        if request.job_id in self.reserved:
            return True
        decision = self.admission.try_reserve(request.job_id, memory.job_peak_bytes(request),
                                              load_bytes=self.weights if self.on_cpu else 0)
        if decision:
            self.reserved.add(request.job_id)
        return decision

    # --- while a job runs -----------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, request, job=None):
        """Around the GPU work of one job: wait for its reservation (taken before the job left the
        queue, or now for jobs that came through rq), bring weights back if they were moved to CPU."""
        if self.admission is None:
            yield
            return
        message = self._never_fits(request)
        if message:
            raise NeverFits("", message)
        check_cancel = CancelCheck(self.runtime.redis, request.job_id)
        waited = time.monotonic()
        while not self._reserve(request):
            check_cancel()
            time.sleep(WAIT_S)  # polling the admission document: other processes free memory
        waited = time.monotonic() - waited
        with self._move_lock:
            reload_s = self._bring_back() if self.on_cpu else 0.0
        if job is not None:
            job.meta.update(vram_wait_s=round(waited, 3), weights_reload_s=round(reload_s, 3))
            job.save_meta()
        try:
            yield
        finally:
            self.reserved.discard(request.job_id)
            free_cached_memory()  # what admission now counts as free must be free for the other processes
            if not self.reserved:  # a job of a new size may have recorded another CUDA graph
                self._remeasure_held()
            self.admission.release(request.job_id)

    def _bring_back(self) -> float:
        started = time.monotonic()
        self.runtime.pipeline.move_to(self.runtime.pipeline.device)
        self.on_cpu = False
        self._report_resident()
        cost = time.monotonic() - started
        log.info("moved %s weights back to the GPU in %.2fs", self.family, cost)
        return cost

    def _remeasure_held(self) -> None:
        held = held_beyond_allocations(self.runtime.pipeline)
        if held != self.held:
            self.held = held
            self._report_resident()

    def _offload_if_asked(self) -> None:
        with self._move_lock:
            # Never while a job of this process holds a reservation: its weights may be in use.
            if self.on_cpu or self.reserved or not self._offloadable() or not self.admission.should_offload():
                return
            self._offload()

    def _offload(self) -> None:
        started = time.monotonic()
        self.runtime.pipeline.move_to("cpu")
        free_cached_memory()
        self.on_cpu = True
        self._report_resident()
        log.info("moved idle %s weights to CPU in %.2fs to make room for another daemon's job",
                 self.family, time.monotonic() - started)

    # --- out of memory --------------------------------------------------------------------
    def record_outcome(self, exc: BaseException | None) -> bool:
        """True when OOMs keep coming: the daemon should exit so the orchestrator restarts it."""
        if exc is not None and memory.is_oom(exc):
            free_cached_memory()  # give the failed job's blocks back before the next job
        return self.oom.record(exc)

    # --- status ---------------------------------------------------------------------------
    def publish(self, worker_name: str, current_job: str | None, progress: Any = None) -> None:
        """One hash per daemon process, whatever number of workers it runs (consumers/crew.py)."""
        with self._status_lock:
            self.running[worker_name] = (current_job, progress) if current_job else None
            jobs = [entry for entry in self.running.values() if entry]
        settings = self.runtime.settings
        key = memory.DAEMON_KEY.format(worker=process_of(worker_name))
        fields = {"family": self.family, "gpu": settings.gpu_index, "host": settings.worker_host,
                  "resident_bytes": 0 if self.on_cpu else self.weights,
                  "models": json.dumps(sorted(memory.resident_parts(self.family, settings))),
                  "current_job": ",".join(job for job, _ in jobs),
                  "progress": ",".join("" if p is None else str(p) for _, p in jobs),
                  "updated_at": time.time()}
        with self.runtime.redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, 120)
            pipe.execute()

    def leave(self, worker_name: str) -> None:
        """A worker stopped; the last one to stop takes the process's hash and reservations away."""
        with self._status_lock:
            self.running.pop(worker_name, None)
            self.left.add(worker_name)
            last = len(self.left) >= self.workers
        if last:
            self.runtime.redis.delete(memory.DAEMON_KEY.format(worker=process_of(worker_name)))
            if self.admission is not None:
                self._heartbeat.set()
                self.admission.leave()


@contextlib.contextmanager
def loading(admission: memory.Admission | None, pipeline, family: str, settings):
    """Loading and warming up are GPU work too: reserve the weights and the warm-up's peak first, so
    daemons starting together on one card (or one restarting next to running jobs) take turns
    instead of running out of memory."""
    if admission is None:
        yield
        return
    key = f"warmup:{admission.holder}"
    weights = memory.resident_bytes(family, settings) - table_overhead()
    if hasattr(pipeline, "fit_warmup"):
        plan = memory.card_plan(admission.redis, settings.worker_host, settings.gpu_index)
        room = (plan.ceiling() if plan else admission.capacity) - memory.resident_bytes(family, settings)
        pipeline.fit_warmup(lambda shape: memory.job_peak_bytes(shape) <= room)
    peak = warmup_peak_bytes(pipeline, family)
    waited = time.monotonic()
    while not (decision := admission.try_reserve(key, peak, load_bytes=weights)):
        if decision.impossible:
            raise RuntimeError(f"{family}: the weights ({memory.gib(weights)}) and the warm-up "
                               f"({memory.gib(peak)}) can never fit this card's {memory.gib(admission.capacity)}")
        time.sleep(WAIT_S)
    log.info("%s: %s of weights and %s of warm-up reserved after %.1fs", family, memory.gib(weights),
             memory.gib(peak), time.monotonic() - waited)
    try:
        yield
    finally:
        free_cached_memory()
        admission.release(key)


def warmup_peak_bytes(pipeline, family: str) -> int:
    """The warm-up's working memory: the pipeline's own shape, else today's largest reference job."""
    shape = pipeline.warmup_shape() if hasattr(pipeline, "warmup_shape") else None
    if shape is None:
        shape = memory.shape(family, **memory.table()["reference_jobs"][family])
    return memory.job_peak_bytes(shape)


def free_cached_memory() -> None:
    """Hand PyTorch's cached blocks back to the driver: another process on this card may need them."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def held_beyond_allocations(pipeline) -> int:
    """GPU memory this process keeps, after handing its cached blocks back, that no live tensor
    accounts for: the private pools of CUDA graphs (SDXL compiles under them, and so does the chat
    engine's decode step), which neither empty_cache nor moving the weights to CPU returns. The memory
    table knows weights and job peaks only, so admission adds this to the daemon's resident bytes."""
    import torch

    device = getattr(pipeline, "device", None)
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_initialized():
        return 0
    free_cached_memory()
    return max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def table_overhead() -> int:
    return memory.table()["process_overhead_bytes"]
