"""The callback body today's `job-callback` edge function accepts (contract section 4)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["processing", "completed", "failed", "cancelled"]


class Asset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image", "video"]
    url: str  # path inside the bucket, without the bucket
    thumbnail_url: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class CallbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    status: Status
    worker_id: str
    assets: list[Asset] | None = None  # completed only, in output order
    error_message: str | None = None  # failed only
    # Merged by the receiver into every asset's settings: never per-asset keys here.
    metadata: dict[str, Any] = Field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        if body["assets"] is None:
            del body["assets"]
        return body


def failed(job_id: str, worker_id: str, message: str, reason: str, **metadata: Any) -> CallbackBody:
    return CallbackBody(job_id=job_id, status="failed", worker_id=worker_id,
                        error_message=message[:2000], metadata={"reason": reason, **metadata})
