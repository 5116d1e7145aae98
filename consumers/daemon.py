"""Building and running one daemon: setup() once (model resident), then rq's work loop."""
from __future__ import annotations

import logging
import math
import time
import uuid

import memory
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.settings import Settings

from .crew import Crew, GpuTurn, NoTurn, thread_name
from .families import FAMILIES
from .gpu import GpuGate, loading
from .intake import Intake
from .runtime import Runtime, install
from .worker import GenqWorker

log = logging.getLogger(__name__)


def connect(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url.get_secret_value(), health_check_interval=30)


def build(family_name: str, settings: Settings, redis: Redis | None = None) -> list[GenqWorker]:
    """The process's workers (consumers/crew.py), sharing one resident pipeline and one GPU gate."""
    from uploader import Uploader

    family = FAMILIES[family_name]
    redis = redis or connect(settings)
    worker_id = f"{family.name}-gpu{settings.gpu_index}-{settings.worker_host}"
    name = f"{worker_id}-{uuid.uuid4().hex[:6]}"
    log.info("%s: loading the %s pipeline", name, family.name)
    started = time.perf_counter()
    pipeline = family.load_pipeline(settings)
    admission = memory.daemon_admission(redis, settings, name, family.name)
    with loading(admission, pipeline, family.name, settings):
        pipeline.setup()
    log.info("%s: %s pipeline ready in %.1fs (load and warm-up)", name, family.name, time.perf_counter() - started)
    count = settings.worker_threads or family.threads
    runtime = Runtime(settings=settings, redis=redis, family=family, pipeline=pipeline,
                      uploader=Uploader(settings, redis), worker_id=worker_id,
                      turn=GpuTurn() if family.takes_turns and count > 1 else NoTurn())
    runtime.gpu = GpuGate(runtime, admission, workers=count)
    install(runtime)
    queue = Queue(family.raw_queue, connection=redis, serializer=JSONSerializer)
    log.info("%s: %d worker(s)%s", name, count, ", taking turns on the GPU" if isinstance(runtime.turn, GpuTurn) else "")
    return [_worker(runtime, queue, thread_name(name, i)) for i in range(count)]


def _worker(runtime: Runtime, queue: Queue, name: str) -> GenqWorker:
    s = runtime.settings
    intake = Intake(redis=runtime.redis, queue=queue, raw_queue=runtime.family.raw_queue, worker_name=name,
                    max_payload_bytes=s.max_payload_bytes, max_attempts=s.max_attempts,
                    job_timeout_s=s.job_timeout_s, result_ttl_s=s.result_ttl_s, failure_ttl_s=s.failure_ttl_s)
    return GenqWorker(runtime, queue, intake, name=name)


def run(family_name: str, settings: Settings, burst: bool = False, log_level: str = "INFO") -> int:
    workers = build(family_name, settings)
    # A (re)start is the natural moment to retry every callback left over, whatever its backoff says:
    # the receiver may have come back meanwhile, and a burst run may not live until they fall due.
    delivered = workers[0].runtime.uploader.deliver_outbox(due_by=math.inf)
    if delivered:
        log.info("delivered %d callback(s) left over from an earlier run", delivered)
    try:
        return Crew(workers).work(burst=burst, logging_level=log_level, with_scheduler=False)
    finally:
        close = getattr(workers[0].runtime.pipeline, "close", None)
        if close is not None:
            close()  # the chat engine's thread fails whatever still waits, clearly
