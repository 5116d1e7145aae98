"""uploader.py against real HTTP stubs (Storage, job-callback) and a private redis-server (`r`)."""
from __future__ import annotations

import io
import json
import logging
import math
import shutil
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
from PIL import Image
from tenacity import wait_none

from schemas.common import Reference
from schemas.settings import Settings
from tests.stubs import json_reply
from tests.stubs.callback_receiver import CallbackReceiver
from tests.stubs.storage import StorageStub
from uploader import (OUTBOX, OUTBOX_DUE, FetchError, StorageError, StoredAsset, Uploader, encode_mp4, encode_png,
                      encode_webp_thumbnail, image_paths)

KEY, SECRET = "service-key-for-tests", "callback-secret-for-tests"
USER, JOB = "11111111-1111-4111-8111-111111111111", "aaaaaaaa-0000-4000-8000-000000000002"
FIELD = "metadata.reference_image_url"


def make_settings(**changes) -> Settings:
    """Settings independent of the environment the tests run in."""
    values = dict(supabase_url=None, supabase_service_role_key=None, job_callback_url=None,
                  job_callback_secret=None, storage_backend="local", fetch_allowed_hosts=[],
                  fetch_allow_private=False)
    return Settings(**{**values, **changes})


def png(size=(64, 48), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def uploaders(r):
    """Make Uploaders on the private redis whose retry bursts do not wait; closed afterwards."""
    made = []

    def make(settings: Settings, **kwargs) -> Uploader:
        made.append(Uploader(settings, r, **{"backoff": wait_none(), **kwargs}))
        return made[-1]

    yield make
    for u in made:
        u.close()


@pytest.fixture
def storage():
    with StorageStub(service_key=KEY) as stub:
        yield stub


@pytest.fixture
def on_stub(storage, uploaders) -> Uploader:
    return uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key=KEY,
                                   storage_backend="supabase"))


# --- storage: Supabase ---------------------------------------------------------------------------

def test_images_are_uploaded_with_exact_types_upsert_and_service_key(storage, on_stub):
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 48), "blue")]
    assets = on_stub.store_images(USER, JOB, images)

    assert [a.url for a in assets] == [f"{USER}/{JOB}/0.png", f"{USER}/{JOB}/1.png"]
    assert assets[1] == StoredAsset(f"{USER}/{JOB}/1.png", f"{USER}/{JOB}/1.thumb.webp", 96, 48,
                                    len(storage.objects[("workspace-temp", f"{USER}/{JOB}/1.png")][0]))
    assert sorted(path for _, path in storage.objects) == sorted(p for i in (0, 1) for p in image_paths(USER, JOB, i))
    for upload in storage.uploads:
        assert upload["bucket"] == "workspace-temp" and upload["upsert"] is True
        assert upload["content_type"] == ("image/png" if upload["path"].endswith(".png") else "image/webp")
        assert upload["headers"]["Authorization"] == f"Bearer {KEY}"
    data, content_type = storage.objects[("workspace-temp", f"{USER}/{JOB}/1.png")]
    assert content_type == "image/png" and Image.open(io.BytesIO(data)).size == (96, 48)
    thumb = Image.open(io.BytesIO(storage.objects[("workspace-temp", f"{USER}/{JOB}/1.thumb.webp")][0]))
    assert (thumb.format, thumb.size) == ("WEBP", (256, 128))


def test_a_retried_upload_overwrites_the_same_names(storage, on_stub):
    on_stub.store_images(USER, JOB, [Image.new("RGB", (64, 64), "red")])
    on_stub.store_images(USER, JOB, [Image.new("RGB", (64, 64), "green")])
    assert set(storage.objects) == {("workspace-temp", p) for p in image_paths(USER, JOB, 0)}
    assert storage.upload_count[("workspace-temp", f"{USER}/{JOB}/0.png")] == 2
    data, _ = storage.objects[("workspace-temp", f"{USER}/{JOB}/0.png")]
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (0, 128, 0)


def test_a_short_storage_outage_is_ridden_out_and_a_long_one_is_a_storage_error(storage, on_stub):
    storage.fail_next(3, status=503)  # HTML pages, like a proxy in front of Storage
    on_stub.upload(f"{USER}/{JOB}/0.png", png(), "image/png")
    assert storage.statuses == [503, 503, 503, 200]

    storage.fail_next(10, status=502)
    with pytest.raises(StorageError) as err:
        on_stub.upload(f"{USER}/{JOB}/1.png", png(), "image/png")
    assert err.value.status == 502
    assert storage.statuses[4:] == [502] * 4  # attempts=4, then given up


@pytest.mark.parametrize("content_type, status", [("application/octet-stream", 415), ("text/plain", 415)])
def test_a_refused_type_is_final(storage, on_stub, content_type, status):
    with pytest.raises(StorageError) as err:
        on_stub.upload(f"{USER}/{JOB}/0.bin", b"\x00" * 10, content_type)
    assert err.value.status == status and storage.statuses == [status]


def test_a_wrong_service_key_is_final(storage, uploaders):
    wrong = uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key="not-the-key",
                                    storage_backend="supabase"))
    with pytest.raises(StorageError):
        wrong.upload(f"{USER}/{JOB}/0.png", png(), "image/png")
    assert len(storage.statuses) == 1 and storage.statuses[0] in (401, 403) and not storage.objects


def test_video_is_browser_playable_h264(storage, on_stub):
    frames = np.stack([np.full((48, 64, 3), 20 * i, np.uint8) for i in range(9)])
    asset = on_stub.store_video(USER, JOB, frames, fps=16)

    assert asset == StoredAsset(f"{USER}/{JOB}/0.mp4", f"{USER}/{JOB}/0.thumb.webp", 64, 48, asset.file_size_bytes)
    data, content_type = storage.objects[("workspace-temp", f"{USER}/{JOB}/0.mp4")]
    assert content_type == "video/mp4" and len(data) == asset.file_size_bytes
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: playable while downloading
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.width, stream.height, stream.average_rate) == (64, 48, 16)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 9
    assert abs(int(decoded[4].mean()) - 80) <= 3  # frames keep their order
    thumb_bytes, thumb_type = storage.objects[("workspace-temp", f"{USER}/{JOB}/0.thumb.webp")]
    thumb = Image.open(io.BytesIO(thumb_bytes))
    assert (thumb_type, thumb.format, thumb.size) == ("image/webp", "WEBP", (256, 192))
    assert abs(thumb.convert("L").getpixel((128, 96)) - 80) <= 3  # the middle frame


def test_mp4_from_pil_frames_with_odd_sides_is_cropped_to_even():
    frames = [Image.new("RGB", (65, 49), (i * 10, 0, 0)) for i in range(5)]
    with av.open(io.BytesIO(encode_mp4(frames, fps=8))) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.average_rate) == (64, 48, 8)
        assert sum(1 for _ in container.decode(stream)) == 5


@pytest.mark.parametrize("size, thumb", [((1024, 576), (256, 144)), ((576, 1024), (144, 256)), ((64, 64), (256, 256))])
def test_thumbnails_are_webp_with_longest_edge_256(size, thumb):
    img = Image.open(io.BytesIO(encode_webp_thumbnail(Image.new("RGB", size, "white"))))
    assert (img.format, img.size) == ("WEBP", thumb)


def noisy_image(size=(96, 64), mode="RGB", seed=0) -> Image.Image:
    """Smooth content plus grain, like a generated image (compressible, but not trivially)."""
    rng = np.random.default_rng(seed)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).resize(size, Image.Resampling.BICUBIC))
    grain = np.clip(smooth + rng.normal(0, 2, smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(grain).convert(mode)


@pytest.mark.parametrize("mode, stored_mode", [("RGB", "RGB"), ("RGBA", "RGBA"), ("L", "L"), ("LA", "RGBA"),
                                               ("P", "RGB"), ("CMYK", "RGB")])
def test_png_encoding_is_lossless_in_every_mode(mode, stored_mode):
    img = noisy_image(mode=mode)
    with Image.open(io.BytesIO(encode_png(img))) as decoded:
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", stored_mode, img.size)
        assert np.array_equal(np.asarray(decoded), np.asarray(img.convert(stored_mode)))


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_a_png_deflated_in_parts_decodes_exactly_in_pillow_and_ffmpeg(mode, threads):
    """The parts (png_encoding.py) form one valid zlib stream: both decoders read every pixel back."""
    img = noisy_image((301, 333), mode=mode)  # 333 rows: up to 5 parts of at least 64 rows
    data = encode_png(img, 1, threads=threads)
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()  # Pillow checks the CRCs and the zlib stream's end as it reads
        assert np.array_equal(np.asarray(decoded), np.asarray(img))
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        fmt = {"RGB": "rgb24", "RGBA": "rgba", "L": "gray"}[mode]
        assert np.array_equal(frame.to_ndarray(format=fmt), np.asarray(img))


def test_stored_pngs_keep_every_pixel_at_any_compress_level(storage, uploaders):
    """GENQ_PNG_COMPRESS_LEVEL changes the size of the PNGs, never their pixels or the thumbnails."""
    img = noisy_image((200, 120))
    sizes = {}
    for level in (0, 1, 9):
        up = uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key=KEY,
                                     storage_backend="supabase", png_compress_level=level))
        job = f"aaaaaaaa-0000-4000-8000-00000000000{level}"
        [asset] = up.store_images(USER, job, [img])
        data, _ = storage.objects[("workspace-temp", asset.url)]
        with Image.open(io.BytesIO(data)) as decoded:
            assert np.array_equal(np.asarray(decoded), np.asarray(img))
        with Image.open(io.BytesIO(storage.objects[("workspace-temp", asset.thumbnail_url)][0])) as thumb:
            assert (thumb.format, thumb.size) == ("WEBP", (256, 154))
        sizes[level] = asset.file_size_bytes
    assert sizes[0] >= 200 * 120 * 3 > sizes[1] >= sizes[9]  # level 0 stores the rows uncompressed


class RefusingThumbnails(StorageStub):
    def _upload(self, request, rest):
        if rest.endswith(".webp"):
            return json_reply(403, {"statusCode": "403", "error": "Unauthorized", "message": "no"})
        return super()._upload(request, rest)


def test_a_refused_thumbnail_fails_the_store_of_its_images(uploaders):
    """PNGs and thumbnails go up side by side; a job never reports an image whose thumbnail is missing."""
    with RefusingThumbnails(service_key=KEY) as storage:
        up = uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key=KEY, storage_backend="supabase"))
        with pytest.raises(StorageError, match="thumb.webp"):
            up.store_images(USER, JOB, [noisy_image(seed=i) for i in range(3)])


# --- storage: local folder -------------------------------------------------------------------------

def test_local_backend_writes_files_and_refuses_escapes(tmp_path, uploaders):
    root = tmp_path / "out"
    local = uploaders(make_settings(output_dir=root))
    local.store_images(USER, JOB, [Image.new("RGB", (64, 64), "red")])
    folder = root / "workspace-temp" / USER / JOB
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "0.thumb.webp"]  # no temp files left
    assert Image.open(folder / "0.png").size == (64, 64)

    (root / "workspace-temp" / "link").symlink_to(tmp_path)
    for path in ["../escape.png", f"{USER}/../../escape.png", f"{USER}//0.png", f"{USER}\\0.png", "/abs.png",
                 "link/escape.png", f"{USER}/./0.png"]:
        with pytest.raises(StorageError):
            local.upload(path, png(), "image/png")
    assert not (tmp_path / "escape.png").exists()
    with pytest.raises(ValueError):
        local.store_images("../x", JOB, [Image.new("RGB", (8, 8))])


def test_local_backend_serves_bare_paths_as_references(tmp_path, uploaders):
    local = uploaders(make_settings(output_dir=tmp_path))
    local.upload(f"{USER}/ref.png", png((40, 30)), "image/png")
    img = local.fetch_reference(Reference(source=f"workspace-temp/{USER}/ref.png"), FIELD)
    assert (img.mode, img.size) == ("RGB", (40, 30))
    with pytest.raises(FetchError):
        local.fetch_reference(Reference(source=f"workspace-temp/{USER}/missing.png"), FIELD)


# --- reference fetching ----------------------------------------------------------------------------

def test_signed_url_is_fetched_and_a_bad_token_is_final(storage, on_stub):
    storage.put_object("user-library", f"{USER}/ref.png", png((40, 30), "blue"))
    img = on_stub.fetch_reference(Reference(source=storage.sign("user-library", f"{USER}/ref.png")), FIELD)
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (40, 30), (0, 0, 255))

    forged = storage.sign("user-library", f"{USER}/ref.png").split("?")[0] + "?token=forged"
    with pytest.raises(FetchError) as err:
        on_stub.fetch_reference(Reference(source=forged), FIELD)
    assert err.value.field == FIELD and storage.statuses == [200, 400]  # a 4xx is not retried


def test_bare_path_is_fetched_with_the_service_key(storage, on_stub):
    storage.put_object("workspace-temp", f"{USER}/my ref.png", png((20, 10)))
    img = on_stub.fetch_reference(Reference(source=f"workspace-temp/{USER}/my ref.png"), FIELD)
    assert img.size == (20, 10)


@pytest.mark.parametrize("source", ["user-library/../secrets.png", "user-library//x.png", "user-library\\x.png",
                                    "other-bucket/x.png", "user-library", "user-library/./x.png"])
def test_bad_bare_paths_are_refused(storage, on_stub, source):
    with pytest.raises(FetchError) as err:
        on_stub.fetch_reference(Reference(source=source), FIELD)
    assert err.value.field == FIELD and storage.statuses == []


@pytest.mark.parametrize("source", [
    "https://evil.example.com/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://localhost:{port}/storage/v1/object/sign/user-library/x.png?token=t",  # not the configured host
    "http://127.0.0.1:1/x.png",
    "https://user:pw@{host}/x.png",
    "ftp://example.com/x.png",
    "https://example.com:99999/x.png",
])
def test_other_hosts_are_refused(storage, on_stub, source):
    source = source.format(port=storage.port, host=f"127.0.0.1:{storage.port}")
    with pytest.raises(FetchError) as err:
        on_stub.fetch_reference(Reference(source=source), "config.image")
    assert err.value.field == "config.image" and storage.statuses == []


@pytest.mark.parametrize("host", ["169.254.169.254", "10.0.0.1", "127.0.0.1", "localhost", "224.0.0.1"])
def test_allowed_hosts_still_may_not_reach_private_addresses(uploaders, host):
    up = uploaders(make_settings(fetch_allowed_hosts=[host]))
    with pytest.raises(FetchError, match="private or reserved"):
        up.fetch_reference(Reference(source=f"https://{host}/x.png"), FIELD)


@pytest.fixture(scope="module")
def localhost_tls(tmp_path_factory):
    """A self-signed certificate for `localhost`: (server SSLContext, certificate file the client trusts)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


def test_allowed_https_host_is_fetched_with_its_name_checked_and_no_key(localhost_tls, monkeypatch, storage, uploaders):
    context, cert = localhost_tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when the Uploader builds its HTTP client
    with StorageStub(service_key="external", tls=context) as external:
        external.put_object("user-library", "a/ref.png", png((30, 20)))
        url = external.sign("user-library", "a/ref.png").replace("127.0.0.1", "localhost")
        up = uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key=KEY, storage_backend="supabase",
                                     fetch_allowed_hosts=["LocalHost"], fetch_allow_private=True))
        up.upload(f"{USER}/{JOB}/0.png", png(), "image/png")
        assert up.fetch_reference(Reference(source=url), FIELD).size == (30, 20)
        with pytest.raises(FetchError):  # plain http is never fetched from an allowed host
            up.fetch_reference(Reference(source=url.replace("https:", "http:")), FIELD)
        [(method, _, headers)] = external.requests
        assert method == "GET" and headers["Host"] == f"localhost:{external.port}"
        assert KEY not in json.dumps(headers)  # the service key only ever goes to the Supabase project


def test_redirects_are_not_followed(storage, on_stub):
    storage.redirects[("user-library", "a/ref.png")] = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(FetchError, match="redirects are not followed"):
        on_stub.fetch_reference(Reference(source="user-library/a/ref.png"), FIELD)


def test_source_outage_is_retried_then_final(storage, on_stub):
    storage.put_object("user-library", "a/ref.png", png())
    storage.fail_next(2)
    assert on_stub.fetch_reference(Reference(source="user-library/a/ref.png"), FIELD).size == (64, 48)
    storage.fail_next(4)
    with pytest.raises(FetchError, match="could not fetch"):
        on_stub.fetch_reference(Reference(source="user-library/a/ref.png"), FIELD)


@pytest.mark.parametrize("send_length", [True, False])
def test_oversize_references_are_refused(storage, uploaders, send_length):
    up = uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key=KEY, fetch_max_bytes=2048))
    storage.send_length = send_length  # without Content-Length the bytes are counted while streaming
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    storage.put_object("user-library", "a/big.png", buf.getvalue())
    with pytest.raises(FetchError, match="larger than 2048 bytes"):
        up.fetch_reference(Reference(source="user-library/a/big.png"), FIELD)


def test_too_many_pixels_and_non_images_are_refused(storage, uploaders):
    up = uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key=KEY, fetch_max_pixels=1024))
    storage.put_object("user-library", "a/wide.png", png((64, 64)))  # 4096 px, a few hundred bytes
    storage.put_object("user-library", "a/text.png", b"<html>not an image</html>" * 10)
    storage.put_object("user-library", "a/ok.png", png((32, 32)))
    with pytest.raises(FetchError, match="more than 1024 pixels"):
        up.fetch_reference(Reference(source="user-library/a/wide.png"), FIELD)
    with pytest.raises(FetchError, match="not a decodable image"):
        up.fetch_reference(Reference(source="user-library/a/text.png"), FIELD)
    assert up.fetch_reference(Reference(source="user-library/a/ok.png"), FIELD).size == (32, 32)


# --- callbacks -------------------------------------------------------------------------------------

@pytest.fixture
def receiver():
    with CallbackReceiver(secret=SECRET, service_key=KEY) as stub:
        yield stub


@pytest.fixture
def callback_settings(receiver) -> Settings:
    return make_settings(job_callback_url=receiver.url, job_callback_secret=SECRET, supabase_service_role_key=KEY)


def body(job_id: str = JOB, status: str = "completed") -> dict:
    return {"job_id": job_id, "status": status, "worker_id": "sdxl-gpu0-test",
            "assets": [{"type": "image", "url": f"{USER}/{job_id}/0.png", "thumbnail_url": f"{USER}/{job_id}/0.thumb.webp",
                        "metadata": {"width": 64, "height": 64, "prompt": "ünïcode ✓"}}],
            "metadata": {"seed": 1}}


def outbox_size(r) -> tuple[int, int]:
    return r.hlen(OUTBOX), r.zcard(OUTBOX_DUE)


def test_callback_is_signed_over_the_exact_bytes_and_leaves_no_outbox_entry(r, receiver, callback_settings, uploaders):
    assert uploaders(callback_settings).send_callback(body()) is True
    assert receiver.received == [body()] and receiver.statuses == [200]
    assert outbox_size(r) == (0, 0)


def test_callback_is_retried_across_5xx(r, receiver, callback_settings, uploaders):
    receiver.fail_next(2, status=502)
    assert uploaders(callback_settings).send_callback(body()) is True
    assert receiver.statuses == [502, 502, 200] and receiver.received == [body()]


def test_callback_survives_a_receiver_outage_and_a_daemon_restart(r, receiver, callback_settings, uploaders):
    receiver.stop()
    assert uploaders(callback_settings, attempts=2).send_callback(body()) is False
    assert outbox_size(r) == (1, 1)
    receiver.start()  # same port

    restarted = uploaders(callback_settings)
    assert restarted.deliver_outbox(now=time.time() + 3600) == 1  # as if its backoff had passed
    assert receiver.received == [body()] and outbox_size(r) == (0, 0)
    assert restarted.deliver_outbox(now=time.time() + 7200) == 0


def test_an_entry_not_yet_due_is_left_alone(r, receiver, callback_settings, uploaders):
    receiver.fail_next(1)
    assert uploaders(callback_settings, attempts=1).send_callback(body()) is False
    created = json.loads(next(iter(r.hvals(OUTBOX))))["created_at"]
    assert uploaders(callback_settings).deliver_outbox(now=created) == 0
    assert receiver.statuses == [503] and outbox_size(r) == (1, 1)


def test_a_restart_delivers_entries_before_their_backoff_but_keeps_their_age(r, receiver, uploaders):
    settings = make_settings(job_callback_url=receiver.url, job_callback_secret=SECRET,
                             supabase_service_role_key=KEY, callback_max_age_s=60)
    receiver.fail_next(1)
    assert uploaders(settings, attempts=1).send_callback(body()) is False  # next try in 5 s
    restarted = uploaders(settings)
    assert restarted.deliver_outbox() == 0  # not due yet
    # what a daemon does at start: everything left over, still judged by its real age (60 s here)
    assert restarted.deliver_outbox(due_by=math.inf) == 1
    assert receiver.received == [body()] and outbox_size(r) == (0, 0)


@pytest.mark.parametrize("secret, key", [("not-the-secret", KEY), (SECRET, "not-the-key")])
def test_a_refused_callback_is_dropped_not_retried(r, receiver, uploaders, caplog, secret, key):
    up = uploaders(make_settings(job_callback_url=receiver.url, job_callback_secret=secret,
                                 supabase_service_role_key=key))
    assert up.send_callback(body()) is False
    assert receiver.statuses == [401] and receiver.received == [] and outbox_size(r) == (0, 0)
    assert "REFUSED with HTTP 401" in caplog.text


def test_a_callback_past_its_max_age_is_dropped_with_an_error(r, receiver, uploaders, caplog):
    settings = make_settings(job_callback_url=receiver.url, job_callback_secret=SECRET,
                             supabase_service_role_key=KEY, callback_max_age_s=60)
    receiver.stop()
    assert uploaders(settings, attempts=1).send_callback(body()) is False
    receiver.start()
    assert uploaders(settings).deliver_outbox(now=time.time() + 3600) == 0
    assert receiver.statuses == [] and outbox_size(r) == (0, 0)
    assert "undelivered" in caplog.text and "dropped" in caplog.text


def test_two_daemons_delivering_the_outbox_at_once_send_each_callback_once(r, receiver, callback_settings, uploaders):
    receiver.stop()
    sender = uploaders(callback_settings, attempts=1)
    jobs = [f"job-{i}" for i in range(16)]
    for job in jobs:
        assert sender.send_callback(body(job, "failed")) is False
    receiver.start()
    daemons = [uploaders(callback_settings), uploaders(callback_settings)]
    later = time.time() + 3600
    with ThreadPoolExecutor(2) as pool:
        delivered = list(pool.map(lambda d: d.deliver_outbox(now=later), daemons))
    assert sum(delivered) == len(jobs)
    assert sorted(b["job_id"] for b in receiver.received) == sorted(jobs)
    assert outbox_size(r) == (0, 0)


def test_without_a_callback_url_the_body_is_logged(r, uploaders, caplog):
    caplog.set_level(logging.INFO, logger="uploader")
    assert uploaders(make_settings()).send_callback(body()) is True
    assert JOB in caplog.text and outbox_size(r) == (0, 0)


def test_progress_callbacks_are_one_try_without_outbox(r, receiver, callback_settings, uploaders):
    up = uploaders(callback_settings)
    receiver.fail_next(1)
    assert up.post_callback(body(status="processing")) is False
    assert up.post_callback(body(status="processing")) is True
    assert receiver.statuses == [503, 200] and outbox_size(r) == (0, 0)


def test_secrets_never_reach_the_logs(r, storage, receiver, uploaders, caplog):
    caplog.set_level(logging.DEBUG)
    up = uploaders(make_settings(supabase_url=storage.url, supabase_service_role_key=KEY, storage_backend="supabase",
                                 job_callback_url=receiver.url, job_callback_secret=SECRET))
    storage.fail_next(1)
    receiver.fail_next(1)
    up.store_images(USER, JOB, [Image.new("RGB", (16, 16))])
    storage.put_object("user-library", "a/ref.png", png())
    up.fetch_reference(Reference(source="user-library/a/ref.png"), FIELD)
    assert up.send_callback(body()) is True
    assert KEY not in caplog.text and SECRET not in caplog.text


# --- chat replies ----------------------------------------------------------------------------------

def test_push_reply_appends_json_with_a_ttl(r, uploaders):
    up = uploaders(make_settings())
    up.push_reply("chat:reply:abc", {"success": True, "response": "hi ✓"}, ttl_s=120)
    assert [json.loads(x) for x in r.lrange("chat:reply:abc", 0, -1)] == [{"success": True, "response": "hi ✓"}]
    assert 0 < r.ttl("chat:reply:abc") <= 120
    for key in ("sdxl_queue", "chat_queue", "rq:queue:sdxl", OUTBOX):
        with pytest.raises(ValueError):
            up.push_reply(key, {"success": True}, ttl_s=120)
    assert r.llen("sdxl_queue") == 0
