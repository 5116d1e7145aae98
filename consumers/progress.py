"""Step progress: in the rq job's meta (rq-dashboard shows it) and as throttled `processing` callbacks.

Processing callbacks are best effort and go through one background sender holding only the latest
one, so a slow callback endpoint never stalls the GPU. `close()` drops anything pending and waits
for a send in flight, so no progress callback can arrive after the final one.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rq.job import Job

from .cancel import CancelCheck

log = logging.getLogger(__name__)

META_EVERY_S = 1.0


class Progress:
    def __init__(self, runtime, job: Job | None, job_id: str | None, stage: str = "generating",
                 callbacks: bool = True):
        self.runtime, self.job, self.job_id, self.stage = runtime, job, job_id, stage
        self.check_cancel = CancelCheck(runtime.redis, job_id)
        self._min_interval = runtime.settings.progress_min_interval_s
        self._last_callback = time.monotonic()  # the first one comes one interval in
        self._last_meta = 0.0
        self._pending: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self._sending = threading.Lock()
        self._closed = False
        self._sender = None
        if callbacks and job_id is not None:
            self._sender = threading.Thread(target=self._send_loop, daemon=True, name="genq-progress")
            self._sender.start()

    def set_stage(self, stage: str, complete: bool = False) -> None:
        """A new stage starts at 0, or at 100 when `complete` (uploading: the output exists), so a single
        progress bar in the web app does not fall back to 0 after generation."""
        self.stage = stage
        self.update(int(complete), 1, force_meta=True)

    def on_step(self, done: int, total: int) -> None:
        """Called by the pipeline after each step (or token); may raise Cancelled."""
        self.check_cancel()
        self.update(done, total)

    def update(self, done: int, total: int, force_meta: bool = False) -> None:
        percent = int(100 * done / total) if total else 0
        now = time.monotonic()
        if self.job is not None and (force_meta or now - self._last_meta >= META_EVERY_S or done == total):
            self._last_meta = now
            self.job.meta.update(progress=percent, stage=self.stage, step=done, total_steps=total)
            self.job.save_meta()
        if self._sender is not None and now - self._last_callback >= self._min_interval:
            self._last_callback = now
            body = {"job_id": self.job_id, "status": "processing", "worker_id": self.runtime.worker_id,
                    "metadata": {"progress": percent, "stage": self.stage}}
            with self._cond:
                self._pending = body
                self._cond.notify()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                body, self._pending = self._pending, None
            # Another lock than the one update() takes, so the GPU never waits on the network;
            # close() takes it to wait for a send in flight.
            with self._sending:
                if self._closed:
                    return
                try:
                    self.runtime.uploader.post_callback(body)
                except Exception:
                    log.warning("progress callback for %s not delivered", self.job_id, exc_info=True)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify()
        with self._sending:
            pass
        if self._sender is not None:
            self._sender.join()
