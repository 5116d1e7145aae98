"""Building and running one daemon: setup() once (model resident), then rq's work loop."""
from __future__ import annotations

import logging
import uuid

import memory
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.settings import Settings

from .families import FAMILIES
from .gpu import GpuGate
from .intake import Intake
from .runtime import Runtime, install
from .worker import GenqWorker

log = logging.getLogger(__name__)


def connect(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url.get_secret_value(), health_check_interval=30)


def build(family_name: str, settings: Settings, redis: Redis | None = None) -> GenqWorker:
    from uploader import Uploader

    family = FAMILIES[family_name]
    redis = redis or connect(settings)
    worker_id = f"{family.name}-gpu{settings.gpu_index}-{settings.worker_host}"
    name = f"{worker_id}-{uuid.uuid4().hex[:6]}"
    log.info("%s: loading the %s pipeline", name, family.name)
    pipeline = family.load_pipeline(settings)
    pipeline.setup()
    runtime = Runtime(settings=settings, redis=redis, family=family, pipeline=pipeline,
                      uploader=Uploader(settings, redis), worker_id=worker_id)
    runtime.gpu = GpuGate(runtime, memory.daemon_admission(redis, settings, name, family.name))
    install(runtime)
    queue = Queue(family.raw_queue, connection=redis, serializer=JSONSerializer)
    intake = Intake(redis=redis, queue=queue, raw_queue=family.raw_queue, worker_name=name,
                    max_payload_bytes=settings.max_payload_bytes, max_attempts=settings.max_attempts,
                    job_timeout_s=settings.job_timeout_s, result_ttl_s=settings.result_ttl_s,
                    failure_ttl_s=settings.failure_ttl_s)
    return GenqWorker(runtime, queue, intake, name=name)


def run(family_name: str, settings: Settings, burst: bool = False, log_level: str = "INFO") -> int:
    worker = build(family_name, settings)
    delivered = worker.runtime.uploader.deliver_outbox()
    if delivered:
        log.info("delivered %d callback(s) left over from an earlier run", delivered)
    worker.work(burst=burst, logging_level=log_level, with_scheduler=False)
    return getattr(worker, "exit_code", 0)
