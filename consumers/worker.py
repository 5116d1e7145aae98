"""GenqWorker: an rq SimpleWorker (jobs run in this process, next to the resident model) that also
takes today's raw lists, heart-beats while a job runs, and reports every terminal state to the caller.

Lifecycle (rq's verbs): dequeue_job_and_maintain_ttl -> execute_job -> perform_job ->
handle_job_success | handle_job_failure; run_maintenance_tasks every GENQ_MAINTENANCE_INTERVAL_S.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import redis
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from .intake import Intake
from .outcomes import Cancelled, classify, describe
from .runtime import Runtime

log = logging.getLogger(__name__)

POLL_S = 2  # how long one blocking take waits; bounds the reaction time to SIGTERM


class GenqWorker(SimpleWorker):
    # Job timeouts by timer thread, not SIGALRM: a daemon runs workers on several threads (crew.py).
    death_penalty_class = TimerDeathPenalty

    def __init__(self, runtime: Runtime, queue: Queue, intake: Intake, **kwargs):
        settings = runtime.settings
        super().__init__(
            [queue], connection=runtime.redis, serializer=queue.serializer,
            maintenance_interval=settings.maintenance_interval_s, worker_ttl=POLL_S * 10, **kwargs,
        )
        self.runtime = runtime
        self.intake = intake
        self.exit_code = 0
        self.crew: Any = None  # consumers.crew.Crew, when this process runs several workers
        self._beat_lock = threading.Lock()
        self._beating: threading.Event | None = None
        self.push_exc_handler(self._on_exception)

    # --- taking jobs -----------------------------------------------------------------------
    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """rq jobs first (retries, dashboard requeues, native enqueues), then the raw list."""
        self.set_state(WorkerStatus.IDLE)
        self.procline(f"Listening on {self.intake.raw_queue}")
        turn = self.runtime.turn
        if not turn.take(lambda: self._stop_requested):
            return None
        result = self._take(timeout)
        if result is None:
            turn.give_back()
        return result

    def _take(self, timeout):
        burst = timeout is None
        backoff = 1.0
        while not self._stop_requested:
            try:
                self.heartbeat()
                self._publish(None)
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                result = Queue.dequeue_any(self._ordered_queues, None, connection=self.connection,
                                           job_class=self.job_class, serializer=self.serializer)
                if result is not None:
                    self.heartbeat()
                    return result
                if not self.runtime.may_take_next():
                    if burst:
                        return None
                    time.sleep(POLL_S / 4)  # waiting for GPU memory held by another daemon
                    continue
                raw = self.intake.take(None if burst else POLL_S)
                if raw is not None:
                    self.intake.admit(raw)
                elif burst:
                    return None
                backoff = 1.0
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                # Redis restarting: keep the model resident and wait for it.
                log.error("redis unavailable (%s); retrying in %.0fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        return None

    def _shutdown(self):
        # SIGTERM: never raise out of a Redis call half-way through a take; finish the job, then stop.
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if self.crew is not None:
            self.crew.stop_all()

    def _install_signal_handlers(self):
        # Only the main thread may install handlers; its worker stops the whole crew.
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def run_maintenance_tasks(self):
        super().run_maintenance_tasks()
        self.intake.recover_orphans(lambda name: bool(self.connection.exists(self.redis_worker_namespace_prefix + name)))
        self.runtime.uploader.deliver_outbox()

    # --- running a job ---------------------------------------------------------------------
    def get_heartbeat_ttl(self, job: Job) -> int:
        # Short on purpose: a job whose daemon died is put back in play within about this long.
        return self.runtime.settings.job_heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue):
        self.prepare_execution(job)
        stop = threading.Event()
        self._beating = stop
        beat = threading.Thread(target=self._beat_while_running, args=(job, stop), daemon=True,
                                name="genq-heartbeat")
        beat.start()
        try:
            self.perform_job(job, queue)
        finally:
            self.runtime.turn.give_back()  # a job that failed before its GPU work ended
            self._stop_beating()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat_while_running(self, job: Job, stop: threading.Event) -> None:
        interval = max(1.0, self.get_heartbeat_ttl(job) / 4)
        while not stop.wait(interval):
            with self._beat_lock:
                if stop.is_set():
                    return
                try:
                    self.maintain_heartbeats(job)
                    self._publish(job.id, job.get_meta(refresh=True).get("progress"))
                    self.runtime.uploader.deliver_outbox()
                except Exception:  # a missed beat is tolerated; the next one may succeed
                    log.warning("heartbeat failed", exc_info=True)

    def _stop_beating(self) -> None:
        with self._beat_lock:
            if self._beating is not None:
                self._beating.set()

    def handle_execution_ended(self, job, queue, timeout):
        self._stop_beating()  # no heartbeat may land after the job has left the started registry
        return super().handle_execution_ended(job, queue, timeout)

    def _publish(self, job_id: str | None, progress=None) -> None:
        if self.runtime.gpu is not None:
            self.runtime.gpu.publish(self.name, job_id, progress)

    def teardown(self):
        if self.runtime.gpu is not None:
            self.runtime.gpu.leave(self.name)
        super().teardown()

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry):
        self._record_oom(None)
        return super().handle_job_success(job, queue, started_job_registry)

    def _record_oom(self, exc: BaseException | None) -> None:
        if self.runtime.gpu is not None and self.runtime.gpu.record_outcome(exc):
            # OOMs keep coming: something on this card is off. Exit non-zero; the orchestrator restarts us.
            log.error("repeated CUDA out-of-memory errors: stopping this daemon so it is restarted")
            self._stop_requested = True
            self.exit_code = 3
            if self.crew is not None:
                self.crew.stop_all()

    # --- failure ---------------------------------------------------------------------------
    def _on_exception(self, job: Job, exc_type, exc_value, tb) -> bool:
        """Runs for failures inside a job and for jobs abandoned by a dead daemon (registry cleanup)."""
        outcome = classify(exc_value)
        if not outcome.retry:
            job.retries_left = 0
        job.meta["error_reason"] = outcome.reason
        if isinstance(exc_value, AbandonedJobError):
            attempts_left = job.retries_left or 0
            log.warning("job %s abandoned by a dead daemon; %d attempt(s) left", job.id, attempts_left)
            if attempts_left <= 0:
                self.runtime.report_failure(job, exc_value)
        return True

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string=""):
        exc = sys.exc_info()[1]
        if isinstance(exc, Cancelled):
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe)
                job.cancel(pipeline=pipe)
                pipe.execute()
            log.info("job %s cancelled", job.id)
            self.runtime.report_failure(job, exc)
            return
        final = not job.should_retry
        self._record_oom(exc)
        if exc is not None:
            job.meta.setdefault("error", describe(exc))
            job.save_meta()
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string)
        if final:
            self.runtime.report_failure(job, exc)
        else:
            log.warning("job %s failed (%s); retrying, %s attempt(s) left", job.id,
                        describe(exc), job.retries_left)
