"""The HTTP stubs behave like the services they stand in for, so other tests can trust them."""
from __future__ import annotations

import hashlib
import hmac
import json
import os

import httpx
import pytest

from tests.stubs.callback_receiver import CallbackReceiver
from tests.stubs.storage import StorageStub

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}", "apikey": KEY}


@pytest.fixture
def storage():
    with StorageStub(service_key=KEY) as stub:
        yield stub


def object_url(storage: StorageStub, bucket: str, path: str) -> str:
    return f"{storage.url}/storage/v1/object/{bucket}/{path}"


def test_storage_accepts_raw_and_multipart_bodies_byte_for_byte(storage):
    tricky = b"\r\n--boundary\r\n\n\r" + os.urandom(2048) + b"\r\n"
    raw = httpx.post(object_url(storage, "workspace-temp", "u/raw.png"), content=tricky,
                     headers={**AUTH, "Content-Type": "image/png"})
    form = httpx.post(object_url(storage, "workspace-temp", "u/form.webp"), headers=AUTH,
                      files={"file": ("form.webp", tricky, "image/webp")}, data={"cacheControl": "3600"})
    assert (raw.status_code, form.status_code) == (200, 200)
    assert raw.json()["Key"] == "workspace-temp/u/raw.png"
    assert storage.objects[("workspace-temp", "u/raw.png")] == (tricky, "image/png")
    assert storage.objects[("workspace-temp", "u/form.webp")] == (tricky, "image/webp")
    assert [u["multipart"] for u in storage.uploads] == [False, True]


def test_storage_refuses_like_supabase(storage):
    url = object_url(storage, "workspace-temp", "u/0.png")
    cases = [
        (httpx.post(url, content=b"x", headers={"Content-Type": "image/png"}), 401),
        (httpx.post(url, content=b"x", headers={"apikey": KEY, "Content-Type": "image/png"}), 403),
        (httpx.post(object_url(storage, "nope", "u/0.png"), content=b"x", headers={**AUTH, "Content-Type": "image/png"}), 404),
        (httpx.post(url, content=b"x", headers={**AUTH, "Content-Type": "application/octet-stream"}), 415),
        (httpx.put(url, content=b"x", headers={**AUTH, "Content-Type": "image/png"}), 400),  # update of nothing
    ]
    assert [r.status_code for r, _ in cases] == [status for _, status in cases]
    assert cases[2][0].json()["error"] == "Bucket not found"
    assert not storage.objects


def test_storage_upsert_semantics(storage):
    url = object_url(storage, "workspace-temp", "u/0.png")
    headers = {**AUTH, "Content-Type": "image/png"}
    assert httpx.post(url, content=b"1", headers=headers).status_code == 200
    duplicate = httpx.post(url, content=b"2", headers=headers)
    assert duplicate.status_code == 400 and duplicate.json()["statusCode"] == "409"
    assert httpx.post(url, content=b"3", headers={**headers, "x-upsert": "true"}).status_code == 200
    assert httpx.put(url, content=b"4", headers=headers).status_code == 200
    assert storage.objects[("workspace-temp", "u/0.png")][0] == b"4"
    assert storage.upload_count[("workspace-temp", "u/0.png")] == 3


def test_storage_serves_seeded_objects_by_key_and_signed_url(storage):
    storage.put_object("user-library", "u/a b.png", b"img", "image/png")
    by_key = httpx.get(object_url(storage, "user-library", "u/a%20b.png"), headers=AUTH)
    signed = httpx.get(storage.sign("user-library", "u/a b.png"))
    assert (by_key.content, signed.content, signed.headers["content-type"]) == (b"img", b"img", "image/png")
    assert httpx.get(object_url(storage, "user-library", "u/a%20b.png")).status_code == 401
    assert httpx.get(storage.sign("user-library", "u/other.png").replace("other", "a%20b")).status_code == 400
    assert httpx.get(object_url(storage, "user-library", "u/missing.png"), headers=AUTH).json()["statusCode"] == "404"


def test_storage_outage_pages_are_html(storage):
    storage.fail_next(2, status=504)
    answers = [httpx.get(object_url(storage, "user-library", "x.png"), headers=AUTH) for _ in range(3)]
    assert [a.status_code for a in answers] == [504, 504, 400]
    assert answers[0].headers["content-type"] == "text/html"
    assert storage.statuses == [504, 504, 400]


def signed_post(receiver: CallbackReceiver, body: dict, secret: str = "s", key: str = KEY) -> httpx.Response:
    data = json.dumps(body).encode()
    signature = "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()
    return httpx.post(receiver.url, content=data, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}", "X-Callback-Signature": signature})


def test_receiver_checks_like_job_callback():
    with CallbackReceiver(secret="s", service_key=KEY) as receiver:
        assert signed_post(receiver, {"job_id": "j", "status": "completed"}, secret="t").status_code == 401
        assert signed_post(receiver, {"job_id": "j", "status": "completed"}, key="x").status_code == 401
        assert signed_post(receiver, {"job_id": "j"}).status_code == 400
        unsigned = httpx.post(receiver.url, json={"job_id": "j", "status": "failed"}, headers={"Authorization": f"Bearer {KEY}"})
        assert unsigned.status_code == 401
        assert signed_post(receiver, {"job_id": "j", "status": "failed"}).json() == {"status": "ok"}
        assert signed_post(receiver, {"job_id": "j", "status": "completed"}).json() == {"status": "ok"}
        assert signed_post(receiver, {"job_id": "j", "status": "failed"}).json() == {"status": "skipped"}
        assert [b["status"] for b in receiver.received] == ["failed", "completed", "failed"]
        assert receiver.wait_for(lambda b: b["status"] == "completed")["job_id"] == "j"
        with pytest.raises(TimeoutError):
            receiver.wait_for(lambda b: b["status"] == "cancelled", timeout=0.05)


def test_receiver_goes_down_and_comes_back_on_the_same_port():
    with CallbackReceiver(secret="s", service_key=KEY) as receiver:
        url = receiver.url
        receiver.stop()
        with pytest.raises(httpx.ConnectError):
            signed_post(receiver, {"job_id": "j", "status": "failed"})
        receiver.start()
        assert receiver.url == url
        receiver.fail_next(1)
        assert signed_post(receiver, {"job_id": "j", "status": "failed"}).status_code == 503
        assert signed_post(receiver, {"job_id": "j", "status": "failed"}).status_code == 200
        assert receiver.wait_for_requests(2) == [503, 200]
