"""rq-dashboard 0.9 against genq's Redis: `python -m consumers dashboard [--port 9181]`.

Our rq jobs are JSON-serialised. rq-dashboard 0.9 can be told so (`--json`), but three of its views
ignore that: the workers view fails while a worker is busy with a JSON job, and "requeue" and
"delete" read the job with the default (pickle) serializer, which corrupts a requeued job's meta.
Here every one of them uses JSONSerializer.
"""
from __future__ import annotations

import rq_dashboard.web as web
from flask import Flask
from functools import partial

from rq import Worker, requeue_job
from rq.job import Job
from rq.serializers import JSONSerializer
from rq_dashboard.cli import make_flask_app

from schemas.settings import Settings


class JsonWorker(Worker):
    @classmethod
    def all(cls, *args, **kwargs):
        kwargs.setdefault("serializer", JSONSerializer)
        return super().all(*args, **kwargs)


class JsonJob(Job):
    @classmethod
    def fetch(cls, *args, **kwargs):
        kwargs.setdefault("serializer", JSONSerializer)
        return super().fetch(*args, **kwargs)


def make_app(redis_url: str) -> Flask:
    web.config.serializer = JSONSerializer
    web.Worker = JsonWorker
    web.Job = JsonJob
    web.requeue_job = partial(requeue_job, serializer=JSONSerializer)
    app = make_flask_app(None, None, None, "", compatibility_mode=False)
    app.config["RQ_DASHBOARD_REDIS_URL"] = redis_url
    web.setup_rq_connection(app)
    return app


def serve(settings: Settings, bind: str, port: int) -> int:
    app = make_app(settings.redis_url.get_secret_value())
    print(f"rq-dashboard on http://{bind}:{port}/")
    app.run(host=bind, port=port)
    return 0
