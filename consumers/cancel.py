"""Cancellation through Redis alone, so an edge function holding only Redis access can cancel.

    SET genq:cancel:<job_id> 1 EX 86400

A job still queued never runs; a running one stops at its next denoising step or within a few tokens.
"""
from __future__ import annotations

import time

from redis import Redis

from .outcomes import Cancelled

CANCEL_TTL_S = 86400


def cancel_key(job_id: str) -> str:
    return f"genq:cancel:{job_id}"


def request_cancel(redis: Redis, job_id: str) -> None:
    redis.set(cancel_key(job_id), 1, ex=CANCEL_TTL_S)


class CancelCheck:
    """Raises Cancelled once the job's cancel key exists; reads Redis at most every `every_s`."""

    # 50 ms: a few tokens of a 7B decode (~6 ms each), at most one step of diffusion; one EXISTS each.
    def __init__(self, redis: Redis, job_id: str | None, every_s: float = 0.05):
        self.redis, self.job_id, self.every_s = redis, job_id, every_s
        self._next = 0.0

    def __call__(self, force: bool = False) -> None:
        if self.job_id is None:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.every_s
        if self.redis.exists(cancel_key(self.job_id)):
            raise Cancelled(f"job {self.job_id} was cancelled by its caller")
