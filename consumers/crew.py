"""Several rq workers in one daemon process, sharing its resident model.

Why threads and not more processes: the weights are loaded once. Image and video daemons run two
workers that take turns on the GPU (`GpuTurn`): while one encodes and uploads the last job's
outputs, the other is already running the next job's denoising. The chat daemon runs one worker per
concurrent conversation; their requests meet in the pipeline's batching engine and decode together.

Each worker is an ordinary rq worker (its own name, heartbeat, intake list and started-registry
entries), so a killed process loses nothing: every job it held goes back in play as before.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

TURN_POLL_S = 0.5  # how often a worker waiting for its turn looks at the stop flag


class GpuTurn:
    """One job's GPU work at a time in this process. A worker takes the turn before it takes a job,
    so a job leaves the queue only when the GPU is free to run it (another daemon may take it
    meanwhile), and gives it back as soon as the job's GPU work is done, before encoding and upload."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mine = threading.local()

    def take(self, should_stop: Callable[[], bool]) -> bool:
        if self.held():
            return True
        while not self._lock.acquire(timeout=TURN_POLL_S):
            if should_stop():
                return False
        self._mine.held = True
        return True

    def held(self) -> bool:
        return getattr(self._mine, "held", False)

    def give_back(self) -> None:
        if self.held():
            self._mine.held = False
            self._lock.release()


class NoTurn:
    """For families whose pipeline runs concurrent requests itself (chat's batching engine)."""

    def take(self, should_stop: Callable[[], bool]) -> bool:
        return True

    def held(self) -> bool:
        return False

    def give_back(self) -> None:
        pass


def thread_name(process_name: str, index: int) -> str:
    """Worker 0 keeps the process's name; the others add -t<i> (orchestrator status groups them)."""
    return process_name if index == 0 else f"{process_name}-t{index}"


def process_of(worker_name: str) -> str:
    head, sep, tail = worker_name.rpartition("-t")
    return head if sep and tail.isdigit() else worker_name


class Crew:
    """Runs workers[0] on the main thread (it owns the signal handlers) and the rest on threads.
    A stop asked of any of them (SIGTERM, repeated OOM) is a stop for all."""

    def __init__(self, workers: Sequence) -> None:
        self.workers = list(workers)
        for w in self.workers:
            w.crew = self

    def stop_all(self) -> None:
        for w in self.workers:
            w._stop_requested = True

    def work(self, **kwargs) -> int:
        threads = [threading.Thread(target=self._run, args=(w, kwargs), name=f"genq-worker-{i}", daemon=True)
                   for i, w in enumerate(self.workers[1:], start=1)]
        for t in threads:
            t.start()
        try:
            self._run(self.workers[0], kwargs)
        finally:
            self.stop_all()
            for t in threads:
                t.join()
        return max(getattr(w, "exit_code", 0) for w in self.workers)

    def _run(self, worker, kwargs) -> None:
        try:
            worker.work(**kwargs)
        except Exception:
            log.exception("worker %s stopped on an error", worker.name)
            worker.exit_code = worker.exit_code or 1
            self.stop_all()
