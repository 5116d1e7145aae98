"""Callbacks for image and video jobs: the terminal ones, built from the request and stored assets."""
from __future__ import annotations

from typing import Any

from schemas.callback import CallbackBody, failed
from schemas.errors import PayloadError
from schemas.payload import job_id_of

from .outcomes import classify, describe, reason_of


def check_decodable(payload: dict) -> None:
    if "_undecodable" in payload:
        raise PayloadError("", str(payload["_undecodable"]))


def report_failure(runtime, payload: dict, exc: BaseException | None) -> None:
    job_id = job_id_of(payload)
    if job_id is None:
        return  # nobody to tell: the failure stays visible in rq's failed registry
    if exc is not None and classify(exc).cancelled:
        body = CallbackBody(job_id=job_id, status="cancelled", worker_id=runtime.worker_id,
                            metadata={"reason": "cancelled"})
    else:
        field = getattr(exc, "field", None)
        extra = {"field": field} if field else {}
        body = failed(job_id, runtime.worker_id, describe(exc), reason_of(exc), **extra)
    runtime.uploader.send_callback(body.wire())


def completed(runtime, job_id: str, assets: list[dict[str, Any]], metadata: dict[str, Any]) -> dict:
    body = CallbackBody(job_id=job_id, status="completed", worker_id=runtime.worker_id,
                        assets=assets, metadata=dict(metadata, worker_id=runtime.worker_id))
    wire = body.wire()
    runtime.uploader.send_callback(wire)
    return wire
