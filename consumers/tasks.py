"""The function every genq rq job names. Python callers may enqueue it directly:

    Queue("sdxl_queue", connection=r, serializer=JSONSerializer).enqueue("consumers.tasks.perform", payload)
"""
from __future__ import annotations

from rq import get_current_job

from .runtime import current


def perform(payload: dict) -> dict:
    runtime = current()
    return runtime.family.handlers.perform(runtime, get_current_job(), payload)
