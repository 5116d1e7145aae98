"""What a daemon process holds for its whole life: settings, Redis, the resident pipeline, the uploader.

rq calls job functions by name (`consumers.tasks.perform`); they find the process's Runtime here.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq.job import Job

from schemas.policy import ContentRule
from schemas.settings import Settings

from .crew import NoTurn
from .families import Family
from .outcomes import describe

log = logging.getLogger(__name__)

_current: "Runtime | None" = None


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    family: Family
    pipeline: Any
    uploader: Any
    worker_id: str  # stable name reported in callbacks, e.g. sdxl-gpu0-host-a
    rule: ContentRule = field(init=False)
    gpu: Any = None  # consumers.gpu.GpuGate, set once the pipeline is resident
    turn: Any = field(default_factory=NoTurn)  # consumers.crew.GpuTurn where workers take turns

    def __post_init__(self) -> None:
        self.rule = ContentRule.from_settings(self.settings)

    def may_take_next(self) -> bool:
        return self.gpu.may_take_next() if self.gpu is not None else True

    def hold_gpu(self, request, job: Job | None):
        """Context around a job's GPU work: its VRAM reservation (a no-op without admission)."""
        return self.gpu.hold(request, job) if self.gpu is not None else contextlib.nullcontext()

    def report_failure(self, job: Job, exc: BaseException | None) -> None:
        """Tell the caller a job ended failed or cancelled. Never raises: the job's state in rq stands."""
        payload = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
        try:
            self.family.handlers.report_failure(self, payload, exc)
        except Exception:
            log.exception("could not report the end of job %s (%s)", job.id, describe(exc))


def install(runtime: Runtime) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("no genq runtime in this process: jobs run inside `python -m consumers <family>`")
    return _current
