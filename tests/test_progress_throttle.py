"""Progress callbacks are throttled by the sender's own clock (no wall-clock timing in the assertion)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import fakeredis
import pytest

from consumers import progress as progress_module
from consumers.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Stands in for the uploader: records each posted body and signals the test."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.posted = threading.Event()

    def post_callback(self, body: dict) -> None:
        self.bodies.append(body)
        self.posted.set()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    return clock


def _progress(job_id: str) -> tuple[Progress, Recorder]:
    """A job's Progress with a one-second interval, posting to a Recorder."""
    uploader = Recorder()
    runtime = SimpleNamespace(redis=fakeredis.FakeRedis(), uploader=uploader, worker_id="w",
                              settings=SimpleNamespace(progress_min_interval_s=1.0))
    return Progress(runtime, None, job_id), uploader


def test_at_most_one_processing_callback_per_interval(clock):
    progress, uploader = _progress("job-1")
    # (seconds since start, step of 10, whether a callback is due: one interval since the last one)
    plan = [(0.5, 1, False), (1.0, 2, True), (1.2, 3, False), (1.9, 4, False), (2.1, 5, True),
            (2.5, 6, False), (3.2, 7, True), (3.3, 8, False)]
    try:
        for at, step, due in plan:
            clock.now = 100.0 + at
            uploader.posted.clear()
            progress.update(step, 10)
            if due:
                assert uploader.posted.wait(10), f"no callback at {at} s"
            else:
                with progress._cond:
                    assert progress._pending is None, f"a callback was queued at {at} s, within the interval"
    finally:
        progress.close()
    assert [b["metadata"]["progress"] for b in uploader.bodies] == [20, 50, 70]
    assert all(b["status"] == "processing" and b["job_id"] == "job-1" for b in uploader.bodies)


def test_uploading_keeps_the_bar_at_100(clock):
    progress, uploader = _progress("job-2")
    try:
        clock.now += 1.0
        progress.set_stage("uploading", complete=True)
        assert uploader.posted.wait(10)
    finally:
        progress.close()
    assert uploader.bodies[-1]["metadata"] == {"progress": 100, "stage": "uploading"}
