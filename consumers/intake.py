"""Taking jobs from today's raw Redis lists, reliably, and turning them into rq jobs.

A raw list element moves atomically (LMOVE) into a per-daemon intake list, then ONE transaction saves
it as an rq job (id = payload id, JSON-serialised), pushes that job to the front of the rq queue and
removes the element from the intake list. A daemon killed in between leaves the element in its intake
list; any live daemon puts such orphans back at the head of the raw list once the dead daemon's rq
worker key has expired. So a job is always in exactly one of: raw list, intake list, rq.
"""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from rq import Queue, Retry
from rq.job import Job

from schemas.common import SAFE_ID
from schemas.payload import decode, job_id_of

log = logging.getLogger(__name__)

TASK = "consumers.tasks.perform"
INTAKE_PREFIX = "genq:intake:"


def intake_key(raw_queue: str, worker_name: str) -> str:
    return f"{INTAKE_PREFIX}{raw_queue}:{worker_name}"


@dataclass
class Intake:
    redis: Redis
    queue: Queue  # the rq queue jobs become part of (named like the raw list)
    raw_queue: str
    worker_name: str
    max_payload_bytes: int
    max_attempts: int
    job_timeout_s: int
    result_ttl_s: int
    failure_ttl_s: int

    @property
    def key(self) -> str:
        return intake_key(self.raw_queue, self.worker_name)

    def take(self, timeout_s: float | None) -> bytes | None:
        """Move the oldest raw element into our intake list. None when the list stayed empty."""
        if timeout_s:
            return self.redis.blmove(self.raw_queue, self.key, timeout_s, "LEFT", "RIGHT")
        return self.redis.lmove(self.raw_queue, self.key, "LEFT", "RIGHT")

    def admit(self, raw: bytes) -> Job:
        """Turn one taken element into a queued rq job, in one transaction with its removal."""
        job = self._job_for(raw)
        with self.redis.pipeline(transaction=True) as pipe:
            self.queue._enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.lrem(self.key, 1, raw)
            pipe.execute()
        log.info("admitted %s from %s", job.id, self.raw_queue)
        return job

    def _job_for(self, raw: bytes) -> Job:
        # Decoding errors are reported by the job itself (tasks.perform), so they show up in rq as
        # failed jobs with the reason, and the caller gets a failed callback when an id is readable.
        try:
            payload = decode(raw, self.max_payload_bytes)
            payload_id = job_id_of(payload)
        except ValueError as exc:
            payload, payload_id = {"_undecodable": str(exc), "_excerpt": _excerpt(raw)}, _sniff_id(raw)
            if payload_id:
                payload["id"] = payload_id
        rq_id = payload_id if payload_id and SAFE_ID.match(payload_id) else f"invalid-{uuid.uuid4()}"
        description = f"{payload.get('type', '?')!s:.40} {payload_id or '(no id)'}"
        return Job.create(
            TASK, args=[payload], id=rq_id, connection=self.redis, serializer=self.queue.serializer,
            timeout=self.job_timeout_s, result_ttl=self.result_ttl_s, failure_ttl=self.failure_ttl_s,
            retry=Retry(max=self.max_attempts - 1) if self.max_attempts > 1 else None,
            origin=self.queue.name, description=description, meta={"raw_queue": self.raw_queue},
        )

    def recover_orphans(self, is_alive: Callable[[str], bool]) -> int:
        """Put elements left in dead daemons' intake lists back at the head of the raw list."""
        moved = 0
        prefix = f"{INTAKE_PREFIX}{self.raw_queue}:"
        for key in self.redis.scan_iter(match=f"{prefix}*", count=100):
            name = key.decode()[len(prefix):] if isinstance(key, bytes) else key[len(prefix):]
            if name == self.worker_name or is_alive(name):
                continue
            # RIGHT->LEFT keeps their original order at the head of the raw list
            while self.redis.lmove(key, self.raw_queue, "RIGHT", "LEFT") is not None:
                moved += 1
        if moved:
            log.warning("put %d job(s) from dead daemons back on %s", moved, self.raw_queue)
        return moved


def _excerpt(raw: bytes) -> str:
    return raw[:300].decode("utf-8", "replace")


def _sniff_id(raw: bytes) -> str | None:
    """Best effort: the id of a payload too broken to decode fully, so its caller still hears back."""
    try:
        value = json.loads(raw)
        if isinstance(value, list) and value and isinstance(value[0], str):
            value = json.loads(value[0])
        if isinstance(value, list) and value:
            value = value[0]
        return job_id_of(value) if isinstance(value, dict) else None
    except ValueError:
        return None
