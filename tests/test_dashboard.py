"""rq-dashboard 0.9 against genq's Redis: its pages render our JSON jobs and busy workers, and a
failed job requeued from it runs again. rq's major version is the one rq-dashboard 0.9 supports."""
from __future__ import annotations

import importlib

import pytest
import rq
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from consumers.dashboard import make_app
from tests.integration import encode, load_payload, stack  # noqa: F401


def test_rq_major_version_is_the_one_rq_dashboard_0_9_supports():
    import rq_dashboard.version
    assert rq_dashboard.version.VERSION == "0.9.0"
    assert int(rq.VERSION.split(".")[0]) == 2  # rq 3 is newer than rq-dashboard 0.9


@pytest.fixture
def client(stack):
    app = make_app(stack.redis_server.url)
    app.config["TESTING"] = True
    yield app.test_client()
    import rq_dashboard.web  # the patch is process-wide: put the stock module back for other tests
    importlib.reload(rq_dashboard.web)


def busy_worker(r, job: Job) -> Worker:
    """A registered worker that is busy with a JSON job, as a running daemon looks in Redis."""
    queue = Queue("sdxl_queue", connection=r, serializer=JSONSerializer)
    worker = Worker([queue], connection=r, serializer=JSONSerializer, name="sdxl-gpu0-testhost-busy")
    worker.register_birth()
    worker.set_state("busy")
    worker.set_current_job_id(job.id)
    return worker


def test_pages_show_finished_failed_and_busy(stack, client):
    good = load_payload("01_sdxl_fast_1_image.json", config__resolution="64x64", config__num_inference_steps=2)
    bad = load_payload("01_sdxl_fast_1_image.json", config__num_images=5)
    stack.r.rpush("sdxl_queue", encode(good, 0), encode(bad, 0))
    stack.run_burst("sdxl")
    queued = load_payload("01_sdxl_fast_1_image.json")
    job = Queue("sdxl_queue", connection=stack.r, serializer=JSONSerializer).enqueue(
        "consumers.tasks.perform", queued, job_id=queued["id"])
    busy_worker(stack.r, job)

    for page in ("/", "/0/view/queues", "/0/view/workers", f"/0/view/job/{good['id']}"):
        assert client.get(page, follow_redirects=True).status_code == 200, page
    queues = client.get("/0/data/queues.json").get_json()["queues"]
    sdxl = next(q for q in queues if q["name"] == "sdxl_queue")
    assert sdxl["count"] == 1 and sdxl["failed_job_registry_count"] == 1
    assert sdxl["finished_job_registry_count"] == 1

    finished = client.get(f"/0/data/job/{good['id']}.json").get_json()
    assert finished["status"] == "finished" and finished["result"]["status"] == "completed"
    assert len(finished["result"]["assets"]) == 1  # the outputs are visible
    failed = client.get(f"/0/data/job/{bad['id']}.json").get_json()
    assert failed["status"] == "failed" and "config.num_images" in failed["exc_info"]

    workers = client.get("/0/data/workers.json").get_json()["workers"]
    busy = next(w for w in workers if w["name"] == "sdxl-gpu0-testhost-busy")
    assert busy["current_job"]["job_id"] == queued["id"]
    listing = client.get("/0/data/jobs/sdxl_queue/failed/8/asc/1.json").get_json()
    assert [j["id"] for j in listing["jobs"]] == [bad["id"]]


def test_stock_dashboard_fails_on_a_busy_json_worker(stack):
    """Why we ship our own launcher: the stock workers view breaks while a daemon is busy."""
    import rq_dashboard.web as web
    from rq_dashboard.cli import make_flask_app

    importlib.reload(web)
    web.config.serializer = JSONSerializer  # what `rq-dashboard --json` does
    app = make_flask_app(None, None, None, "", compatibility_mode=False)
    app.config["RQ_DASHBOARD_REDIS_URL"] = stack.redis_server.url
    web.setup_rq_connection(app)
    job = Queue("sdxl_queue", connection=stack.r, serializer=JSONSerializer).enqueue(
        "consumers.tasks.perform", {"id": "x"}, job_id="x")
    busy_worker(stack.r, job)
    app.config["TESTING"] = False
    assert app.test_client().get("/0/data/workers.json").status_code == 500
    importlib.reload(web)


def test_a_failed_job_requeued_from_the_dashboard_runs_again(stack, client):
    job = load_payload("01_sdxl_fast_1_image.json", config__resolution="64x64", config__num_inference_steps=2)
    stack.storage.fail_next(1000)  # storage down long enough to use up every attempt
    stack.r.rpush("sdxl_queue", encode(job, 0))
    stack.run_burst("sdxl", GENQ_MAX_ATTEMPTS="1")
    assert stack.final_callback(job["id"])["status"] == "failed"
    stack.storage.heal()

    assert client.post(f"/job/{job['id']}/requeue").status_code == 200
    assert Job.fetch(job["id"], connection=stack.r, serializer=JSONSerializer).get_status() == "queued"
    stack.run_burst("sdxl")
    body = stack.receiver.wait_for(lambda b: b["job_id"] == job["id"] and b["status"] == "completed", 120)
    assert body["assets"][0]["url"].endswith("/0.png")
