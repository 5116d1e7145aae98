"""`CallbackReceiver`: a local job-callback that checks exactly what the real one checks (contract section 4).

    with CallbackReceiver(secret="s", service_key="k") as receiver:
        settings = Settings(JOB_CALLBACK_URL=receiver.url, JOB_CALLBACK_SECRET="s", ...)
        ...
        body = receiver.wait_for(lambda b: b["job_id"] == job_id and b["status"] == "completed")

Order of checks: `Authorization: Bearer <service key>` (401), `X-Callback-Signature: sha256=<hex HMAC
of the raw body>` compared in constant time (401), JSON with `job_id` and `status` (400). A job
already `completed` or `cancelled` answers 200 `{"status": "skipped"}`; otherwise `{"status": "ok"}`.
`received` holds every verified body (skipped ones too) in arrival order; `statuses` the HTTP status
of every request, outages included.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Callable

from . import LocalServer, Reply, Request, json_reply

FINAL = ("completed", "cancelled")


class CallbackReceiver(LocalServer):
    def __init__(self, secret: str, service_key: str | None = "service-key", port: int = 0):
        super().__init__(port)
        self.secret = secret.encode()
        self.service_key = service_key
        self.received: list[dict] = []
        self.final: dict[str, str] = {}  # job_id -> the final status it reached
        self._arrived: list[tuple[float, str, str]] = []  # (monotonic time, job_id, status)

    @property
    def url(self) -> str:
        return f"{self.base_url}/functions/v1/job-callback"

    def handle(self, request: Request) -> Reply:
        if self.service_key is not None and request.headers.get("Authorization") != f"Bearer {self.service_key}":
            return json_reply(401, {"error": "Unauthorized"})
        expected = "sha256=" + hmac.new(self.secret, request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), request.headers.get("X-Callback-Signature", "").encode()):
            return json_reply(401, {"error": "Invalid signature"})
        try:
            body = json.loads(request.body)
        except ValueError:
            return json_reply(400, {"error": "Invalid JSON"})
        if not isinstance(body, dict) or not body.get("job_id") or not body.get("status"):
            return json_reply(400, {"error": "Missing job_id or status"})
        with self.changed:
            skipped = body["job_id"] in self.final
            if body["status"] in FINAL and not skipped:
                self.final[body["job_id"]] = body["status"]
            self.received.append(body)
            self._arrived.append((time.monotonic(), body["job_id"], body["status"]))
            self.changed.notify_all()
        return json_reply(200, {"status": "skipped" if skipped else "ok"})

    def arrivals(self, job_id: str, status: str) -> list[float]:
        """When (time.monotonic) each verified callback of this job and status arrived, in order."""
        with self.changed:
            return [t for t, j, s in self._arrived if j == job_id and s == status]

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """The first received body matching `predicate`, waiting up to `timeout` seconds for it."""
        found: list[dict] = []

        def match() -> bool:
            found[:] = [b for b in self.received if predicate(b)][:1]
            return bool(found)

        with self.changed:
            if not self.changed.wait_for(match, timeout):
                raise TimeoutError(f"no matching callback within {timeout} s; received {self.received!r}")
        return found[0]
